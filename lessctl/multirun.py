"""Hydra multirun for lessctl commands: `lessctl train -m train.layers=0,1,2 hydra/launcher=joblib`.

Layers train independently, so a sweep over `train.layers` fans them out over a Hydra launcher:
`hydra/launcher=joblib` on one machine, `hydra/launcher=submitit_slurm` on a SLURM cluster
(`pip install hydra-submitit-launcher`). Every job writes its own layer files into the same
checkpoint folder, and its own run folder.
"""

from __future__ import annotations

import sys

from lessctl.config import config_dir, load_config


def first_point(overrides: list[str]) -> list[str]:
    """The sweep's first point (hydra.* overrides left out), to validate before launching."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    point = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.get_key_element().startswith(("hydra", "+hydra")):
            continue
        if o.is_sweep_override():
            value = next(iter(o.sweep_string_iterator()))
            point.append(f"{o.get_key_element()}={value}")
        else:
            point.append(o.input_line)
    return point


def launch(command: str, overrides: list[str]) -> int:
    """Run `command` once per point of the sweep that `overrides` describe; returns exit code.

    The first point is composed first, so a bad key or option fails with the usual one line."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from lessctl.cli import JOBS

    job = JOBS[command]
    load_config(first_point(overrides))

    @hydra.main(config_path=str(config_dir()), config_name="config", version_base=None)
    def _job(cfg) -> None:
        job(cfg, list(HydraConfig.get().overrides.task))

    has_dir = any(o.startswith("hydra.sweep.dir=") for o in overrides)
    sweep = (
        [] if has_dir else [f"hydra.sweep.dir=results/multirun/{command}/${{now:%Y%m%d-%H%M%S}}"]
    )
    argv = sys.argv
    sys.argv = [f"lessctl-{command}", "--multirun", *overrides, *sweep]
    try:
        _job()
    finally:
        sys.argv = argv
    return 0
