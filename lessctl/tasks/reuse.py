"""What an evaluation's results depend on, so that an interrupted or earlier run's finished work
is read back instead of computed again (`eval.reuse_predictions`: earlier run folders).

A method's digest holds the model (config, dtype, device, weights), the method's name, its
policy with its budget and its kernels (weights, buffers and config); an input's digest adds
the exact tokens it was given. A record is reused only where its digest equals the one
computed now, so another model, policy, budget, checkpoint or text is computed anew. Not part
of a digest: where anything was loaded from, and the code revision.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lessctl.methods import Method
from lessctl.shards import config_hash


def fingerprint(params) -> list[list[float]]:
    """A cheap identity of weights: per tensor its sum and sum of squares (fp64)."""
    with torch.no_grad():
        return [[float(p.double().sum()), float(p.double().square().sum())] for p in params]


def method_digest(model, method: Method) -> str:
    """What a method's results depend on beside its input (module doc)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    kernels = method.kernels or {}
    key = {
        "model": config,
        "dtype": str(model.dtype),
        "device": model.device.type,
        "weights": fingerprint(model.parameters()),
        "method": method.name,
        "policy": repr(method.policy),
        # weights and buffers (Performer's random features are a buffer) and each config
        "kernels": fingerprint(
            t for i in sorted(kernels) for t in kernels[i].state_dict().values()
        ),
        "kernel_configs": [dataclasses.asdict(kernels[i].cfg) for i in sorted(kernels)],
    }
    return config_hash(key, 20)


def records(dirs: list[str], file_name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(folder, record) of every JSON line in ``<dir>/predictions/<file_name>`` and its partial
    twin (``.partial``, what an interrupted run left), for each earlier run folder in ``dirs``;
    a line that does not parse (cut by a kill) is skipped."""
    for d in dirs:
        for path in (
            Path(d) / "predictions" / file_name,
            Path(d) / "predictions" / (file_name + PARTIAL),
        ):
            if not path.exists():
                continue
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        yield str(Path(d)), json.loads(line)
                    except json.JSONDecodeError:
                        continue


PARTIAL = ".partial"  # suffix of a predictions file while it is written
