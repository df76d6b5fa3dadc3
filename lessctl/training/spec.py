"""What a training run is: the kernels' shapes, the spec whose hash names the checkpoint folder,
and the layers selected (`train.layers`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from lessctl.errors import LessctlError
from lessctl.less.kernels import kernel_config  # noqa: F401 (re-exported)
from lessctl.less.states import STATE_DEFAULTS

EVAL_ONLY_LESS_KEYS = ("ckpt", "transfer")  # choose a checkpoint; not part of what is trained
HYPER_KEYS = ("epochs", "batch_size", "lr", "step_size", "gamma", "val_fraction")


def train_spec(cfg: DictConfig, man: dict[str, Any]) -> dict[str, Any]:
    """The spec of the kernels trained on activations ``man`` (an extraction manifest, or the
    online source's equivalent: its ``hash`` is the extraction hash of the same text)."""
    t = cfg.train
    hyper = {k: t[k] for k in (*HYPER_KEYS, "max_train_sequences")}
    spec = {
        "activations": man["hash"],
        "policy": OmegaConf.to_container(cfg.policy, resolve=True),
        "less": {
            k: v
            for k, v in OmegaConf.to_container(cfg.less, resolve=True).items()
            if k not in EVAL_ONLY_LESS_KEYS and STATE_DEFAULTS.get(k, object()) != v
        },
        "train": hyper,
        "seed": int(cfg.seed),
    }
    if man.get("train_source", "shards") != "shards":  # shards' folders keep their old hash
        spec["source"] = man["train_source"]
    if man.get("world", 1) != 1:  # data parallel: the global batch is batch_size x world
        spec["world"] = man["world"]
    return spec


def select_layers(cfg: DictConfig, n_layers: int) -> list[int]:
    """`train.layers` (null: all) checked against the model's ``n_layers``."""
    sel = cfg.train.layers
    if sel is None:
        return list(range(n_layers))
    sel = [int(sel)] if isinstance(sel, int | str) else [int(x) for x in sel]
    bad = [i for i in sel if not 0 <= i < n_layers]
    if bad:
        raise LessctlError(f"train.layers has {bad[0]}; allowed: 0..{n_layers - 1}")
    return sel
