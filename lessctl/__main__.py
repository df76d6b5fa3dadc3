from lessctl.cli import main

main()
