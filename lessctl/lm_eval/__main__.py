"""`python -m lessctl.lm_eval [lm-eval arguments]`: lm-eval's own command line with the
`lessctl` model registered and lessctl's task folder (`taskdefs/`) added to every task search,
next to any `--include_path` of the user's, e.g.

    python -m lessctl.lm_eval --model lessctl \
        --model_args model=smollm2-135m,method=baseline,policy=h2o,budget=32,max_length=512 \
        --tasks lessctl_wikitext,lessctl_mc --limit 4
"""

from __future__ import annotations

import functools
import sys

import lessctl.lm_eval.model  # noqa: F401  (registers --model lessctl)
from lessctl.lm_eval.local_data import TASKDEFS


def requested_tasks(argv: list[str]) -> list[str]:
    """The names given to `--tasks` (comma or space separated) in an lm-eval command line."""
    names: list[str] = []
    for i, arg in enumerate(argv):
        if arg.startswith("--tasks="):
            names += arg.split("=", 1)[1].split(",")
        elif arg in ("--tasks", "-t"):
            for value in argv[i + 1 :]:
                if value.startswith("-"):
                    break
                names += value.split(",")
    return [n for n in names if n]


def include_lessctl_tasks(tasks: list[str]) -> None:
    """Make every lm-eval TaskManager also search `taskdefs/` (lm-eval's --include_path takes
    one folder, which stays the user's); when all `tasks` are lessctl's or the user's, skip
    indexing lm-eval's own ~15k task YAMLs (a minute on 2 cores)."""
    from lm_eval.tasks import TaskManager

    init = TaskManager.__init__
    if getattr(init, "lessctl", False):
        return

    @functools.wraps(init)
    def with_taskdefs(self, verbosity=None, include_path=None, *args, **kw):
        paths = include_path if isinstance(include_path, list | tuple) else [include_path]
        paths = [str(TASKDEFS), *(str(p) for p in paths if p)]
        if tasks and not args and "include_defaults" not in kw:
            init(self, verbosity, paths, include_defaults=False, **kw)
            if set(tasks) <= set(self.all_tasks):
                return
        init(self, verbosity, paths, *args, **kw)

    with_taskdefs.lessctl = True
    TaskManager.__init__ = with_taskdefs


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    include_lessctl_tasks(requested_tasks(sys.argv[1:]))
    cli_evaluate()


if __name__ == "__main__":
    main()
