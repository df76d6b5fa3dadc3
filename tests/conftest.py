"""Shared fixtures: the composed real configs, the tiny random model, the embedded SmolLM2."""

from __future__ import annotations

import pytest
import torch
from omegaconf import DictConfig

from lessctl.config import load_config
from lessctl.models import load_model


@pytest.fixture(autouse=True)
def _isolated_results(tmp_path, monkeypatch):
    """Every test writes run folders into its own tmp dir, never into the repo's results/."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def compose():
    """`compose(*overrides)` → the real `conf/config.yaml` composed with those overrides."""

    def _compose(*overrides: str) -> DictConfig:
        return load_config(list(overrides))

    return _compose


@pytest.fixture(scope="session")
def tiny_model():
    """(model, tokenizer) of `model=tiny-random`: 2-layer Llama, GQA (4 query / 2 KV heads)."""
    cfg = load_config(["model=tiny-random"])
    return load_model(cfg.model, "cpu", torch.float32, seed=0)


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the embedded SmolLM2-135M (slow: needs `lessctl assets`)."""
    cfg = load_config([])
    return load_model(cfg.model, "cpu", torch.float32)
