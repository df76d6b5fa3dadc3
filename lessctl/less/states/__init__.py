"""State variants, one file each, registered by name (``less.state``): see
:mod:`lessctl.less.states.base`. Importing this package imports every variant in it."""

from __future__ import annotations

import importlib
import pkgutil

from lessctl.less.states.base import (
    STATE_DEFAULTS,
    STATES,
    register_state,
    state_label,
    state_problem,
)

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = ["STATE_DEFAULTS", "STATES", "register_state", "state_label", "state_problem"]
