"""lm-evaluation-harness backend: any lm-eval task under any lessctl method.

- `model.py`: `LessctlLM`, lm-eval's HFLM with lessctl's methods (registered as `lessctl`);
- `task.py`: `lessctl eval task=lm_eval`, tasks per method as tidy rows;
- `local_data.py` + `taskdefs/`: offline tasks `lessctl_wikitext` and `lessctl_mc`;
- `__main__.py`: `python -m lessctl.lm_eval ...`, lm-eval's own command line with `lessctl`
  registered and `taskdefs/` included.
"""
