import json

import pytest

from lessctl import extract as E
from lessctl import train as T
from lessctl.errors import LessctlError
from lessctl.methods import build_methods, load_less
from lessctl.models import attention_geometry

from .test_extract import TEXT


@pytest.fixture
def trained(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    ov = ["experiment=smoke", f"data.path={tmp_path / 't.txt'}", "train.epochs=1"]
    E.run(compose(*ov), log=lambda *_: None)
    out, _ = T.run(compose(*ov), log=lambda *_: None)
    return ov, out


def test_less_method_finds_latest_matching_checkpoint(trained, compose, tiny_model):
    ov, out = trained
    geo = attention_geometry(tiny_model[0])
    [m] = build_methods(compose(*ov, "eval.methods=[less]"), geo, 64, "cpu")
    assert m.checkpoint == str(out) and sorted(m.kernels) == [0, 1]


@pytest.mark.parametrize(
    "override,field",
    [("policy=h2o", "policy"), ("less.rank=4", "rank"), ("model.name=other-model", "model")],
)
def test_mismatched_checkpoint_is_refused(trained, compose, tiny_model, override, field):
    ov, out = trained
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, override, f"less.ckpt={out}")
    with pytest.raises(LessctlError, match=f"trained for {field}="):
        load_less(cfg, geo, "cpu")


def test_checkpoint_missing_layer_is_refused(trained, compose, tiny_model):
    ov, out = trained
    (out / "layer_001.safetensors").unlink()
    geo = attention_geometry(tiny_model[0])
    with pytest.raises(LessctlError, match="lacks layer 1"):
        load_less(compose(*ov, f"less.ckpt={out}"), geo, "cpu")
    assert json.loads((out / "manifest.json").read_text())["policy"] == "lambda"
