from lessctl.cli import main

if __name__ == "__main__":  # a spawned child (lessctl bench) imports this without running it
    main()
