import json

import pytest
import torch

from lessctl import extract as E
from lessctl import train as T
from lessctl.errors import LessctlError
from lessctl.methods import CheckpointNotFound, build_methods, load_less
from lessctl.models import attention_geometry
from lessctl.policies import build_policy

from .test_extract import TEXT


@pytest.fixture
def trained(compose, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(TEXT)
    ov = ["experiment=smoke", f"data.path={tmp_path / 't.txt'}", "train.epochs=1"]
    E.run(compose(*ov), log=lambda *_: None)
    out, _ = T.run(compose(*ov), log=lambda *_: None)
    return ov, out


def _policy(cfg, seq_len=64):
    return build_policy(cfg.policy, seq_len=seq_len, max_position_embeddings=512)


def test_less_method_finds_latest_matching_checkpoint(trained, compose, tiny_model):
    ov, out = trained
    geo = attention_geometry(tiny_model[0])
    [m] = build_methods(compose(*ov, "eval.methods=[less]"), geo, 64, "cpu", torch.float32)
    assert m.checkpoint == str(out) and sorted(m.kernels) == [0, 1]
    cols = m.columns()
    assert {k: cols.pop(k) for k in ("trained_budget", "transfer", "extra_tokens")} == {
        "trained_budget": 16,
        "transfer": False,
        "extra_tokens": None,
    }
    # the kernels' text: 24 windows of 64 tokens from the file, trained from shards
    assert cols.pop("kernel_tokens") == 24 * 64 and cols.pop("kernel_train_source") == "shards"
    assert cols.pop("kernel_text_source").startswith("file:") and not cols
    # online kernels say so
    on, _ = T.run(compose(*ov, "train.source=online"), log=lambda *_: None)
    cfg = compose(*ov, "eval.methods=[less]", f"less.ckpt={on}")
    [m] = build_methods(cfg, geo, 64, "cpu", torch.float32)
    assert m.columns()["kernel_train_source"] == "online"
    assert m.columns()["kernel_tokens"] == 24 * 64
    # an online checkpoint counts as trained on this config's text (preferred among matches)
    from lessctl.methods import _same_training

    man = json.loads((on / "manifest.json").read_text())
    assert _same_training(compose(*ov), man)
    assert not _same_training(compose(*ov, "extract.tokens=1024"), man)


def test_checkpoint_records_model_policy_split_kernel_and_data(trained):
    _, out = trained
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == 2 and man["model"] == "tiny-random"
    assert man["split"] == {"name": "lambda", "sink": 4, "recent": 12} and man["budget"] == 16
    assert man["kernel"]["rank"] == 8 and man["kernel"]["hidden"] == 32
    assert man["data"]["dataset"] and man["data"]["source"].startswith("file:")


@pytest.mark.parametrize(
    "override,field",
    [
        ("policy=h2o", "policy"),
        ("less.rank=4", "less.rank"),
        ("less.hidden=64", "less.hidden"),
        ("model.name=other-model", "model"),
    ],
)
def test_mismatched_checkpoint_is_refused(trained, compose, tiny_model, override, field):
    ov, out = trained
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, override, f"less.ckpt={out}")
    with pytest.raises(LessctlError, match=f"trained for {field}="):
        load_less(cfg, geo, "cpu", _policy(cfg))
    # transfer covers a budget, never another model, policy or kernel shape
    cfg = compose(*ov, override, f"less.ckpt={out}", "less.transfer=true")
    with pytest.raises(LessctlError, match=f"trained for {field}="):
        load_less(cfg, geo, "cpu", _policy(cfg))


@pytest.mark.parametrize("override", ["policy.budget.size=32", "policy.sink=2"])
def test_other_budget_or_split_is_refused_unless_transfer(trained, compose, tiny_model, override):
    ov, out = trained
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, override, "eval.methods=[less]")
    # found automatically: no silent fall-back to another budget
    with pytest.raises(LessctlError, match="less.transfer=true") as err:
        build_methods(cfg, geo, 64, "cpu", torch.float32)
    assert "budget 16" in str(err.value) and "\n" not in str(err.value)
    # named explicitly: refused with what differs
    with pytest.raises(LessctlError, match="trained for budget 16 with sink=4 recent=12"):
        load_less(compose(*ov, override, f"less.ckpt={out}"), geo, "cpu", _policy(cfg))
    # the paper's transfer ablation: allowed, and the row says so
    cfg = compose(*ov, override, "eval.methods=[less]", "less.transfer=true")
    [m] = build_methods(cfg, geo, 64, "cpu", torch.float32)
    assert m.checkpoint == str(out) and m.trained_budget == 16 and m.transfer is True
    assert m.policy.budget != 16 or m.policy.sink == 2


def test_old_format_checkpoint_is_refused_with_one_line(trained, compose, tiny_model):
    ov, out = trained
    man = json.loads((out / "manifest.json").read_text())
    del man["format"], man["split"], man["data"]
    (out / "manifest.json").write_text(json.dumps(man))
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, f"less.ckpt={out}")
    with pytest.raises(LessctlError, match="old checkpoint format.*retrain") as err:
        load_less(cfg, geo, "cpu", _policy(cfg))
    assert "\n" not in str(err.value)
    with pytest.raises(LessctlError, match="less.transfer=true"):
        build_methods(compose(*ov, "eval.methods=[less]"), geo, 64, "cpu", torch.float32)
    ck = load_less(compose(*ov, f"less.ckpt={out}", "less.transfer=true"), geo, "cpu", _policy(cfg))
    assert ck.transfer is True and ck.trained_budget == 16


def test_no_checkpoint_at_all(compose, tiny_model, tmp_path):
    geo = attention_geometry(tiny_model[0])
    cfg = compose("experiment=smoke", f"train.dir={tmp_path}")
    with pytest.raises(CheckpointNotFound, match="run `lessctl train`"):
        load_less(cfg, geo, "cpu", _policy(cfg))


def test_checkpoint_missing_layer_is_refused(trained, compose, tiny_model):
    ov, out = trained
    (out / "layer_001.safetensors").unlink()
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, f"less.ckpt={out}")
    with pytest.raises(LessctlError, match="lacks layer 1"):
        load_less(cfg, geo, "cpu", _policy(cfg))
    assert json.loads((out / "manifest.json").read_text())["policy"] == "lambda"
