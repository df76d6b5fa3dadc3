"""Compose the Hydra configs in `conf/` (source checkout) or `lessctl/conf` (installed package)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, OmegaConf

from lessctl.errors import LessctlError
from lessctl.schema import validate


class ConfigError(LessctlError):
    """A bad override: the message is one line naming the bad value and what is allowed."""


def config_dir() -> Path:
    """The folder holding `config.yaml`: packaged copy first, then the source checkout's."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parent / "conf"):
        if (cand / "config.yaml").exists():
            return cand
    raise ConfigError(f"no config.yaml found in {here / 'conf'} or {here.parent / 'conf'}")


def group_options(group: str) -> list[str]:
    """The options of a config group, e.g. `group_options('model')`."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def groups() -> list[str]:
    return sorted(p.name for p in config_dir().iterdir() if p.is_dir())


def _explain(err: BaseException, overrides: list[str]) -> str:
    msg = str(err)
    while err.__cause__ is not None and not msg.strip():
        err = err.__cause__
        msg = str(err)
    m = re.search(r"Could not find '([\w/]+)/([^']+)'", msg)
    if m:
        group, option = m.groups()
        allowed = ", ".join(group_options(group))
        return f"unknown {group} {option!r}; allowed: {allowed}"
    m = re.search(r"Could not override '([^']+)'", msg) or re.search(
        r"Key '([^']+)' (?:is not in struct|not in)", msg
    )
    if m:
        key = m.group(1)
        return f"unknown config key {key!r} (add a new key with +{key}=...; see `--cfg`)"
    m = re.search(r"Could not append to config. An item is already at '([^']+)'", msg)
    if m:
        return f"config key {m.group(1)!r} already exists; drop the leading '+'"
    first = msg.strip().splitlines()[0] if msg.strip() else type(err).__name__
    return f"bad overrides {' '.join(overrides)!r}: {first}"


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """Compose `config.yaml` with Hydra `overrides` (`key=value`, `group=option`, `+key=value`)."""
    overrides = list(overrides or [])
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not of the form key=value or group=option")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base=None):
            cfg = compose(config_name="config", overrides=overrides)
    except (MissingConfigException, ConfigCompositionException) as err:
        raise ConfigError(_explain(err, overrides)) from None
    except Exception as err:  # omegaconf errors raised while merging
        raise ConfigError(_explain(err, overrides)) from None
    finally:
        GlobalHydra.instance().clear()
    validate(cfg)
    return cfg


def resolve_device(name: str) -> torch.device:
    """`auto` → cuda if available, else mps, else cpu; a device this machine lacks is refused
    in one line."""
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if mps else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"device={name!r} is invalid; allowed: auto, cpu, cuda, cuda:N, mps"
        ) from None
    here = ["auto", "cpu"] + (["mps"] if mps else [])
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            here += [f"cuda:0..{n - 1}"] if n else []
            raise ConfigError(
                f"device={name!r} is not available on this machine "
                f"({n} CUDA device(s)); allowed here: {', '.join(here)}"
            )
    if dev.type == "mps" and not mps:
        raise ConfigError(f"device={name!r} is not available here; allowed: {', '.join(here)}")
    return dev


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` → bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; allowed: auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
