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
    keys = ("trained_budget", "transfer", "extra_tokens", "state_ranks", "state_variant")
    keys += ("kernel_kind",)
    assert {k: cols.pop(k) for k in keys} == {
        "trained_budget": 16,
        "transfer": False,
        "extra_tokens": None,
        "state_ranks": [8, 8],  # each layer's kernels' rank
        "state_variant": "sum",  # the paper's state
        "kernel_kind": "learned",
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


def test_one_unreadable_candidate_is_skipped_with_a_warning(trained, compose, tiny_model, capsys):
    """A truncated manifest.json anywhere under train.dir costs one warning naming it; the
    search still finds the good checkpoint beside it."""
    ov, out = trained
    bad = out.parent / "0000broken"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"format": 2, "mod')
    geo = attention_geometry(tiny_model[0])
    [m] = build_methods(compose(*ov, "eval.methods=[less]"), geo, 64, "cpu", torch.float32)
    assert m.checkpoint == str(out)
    err = capsys.readouterr().err.replace("\n", "")
    assert "warning: skipped a LESS checkpoint" in err and str(bad) in err
    (bad / "manifest.json").write_text("")  # given explicitly: refused in one line
    cfg = compose(*ov, f"less.ckpt={bad}")
    with pytest.raises(LessctlError, match="corrupt checkpoint manifest"):
        load_less(cfg, geo, "cpu", _policy(cfg))


def test_a_layer_stopped_by_a_non_finite_loss_is_no_trained_kernel(trained, compose, tiny_model):
    """Its metrics say stopped: the search passes the checkpoint by, and given as less.ckpt it
    is refused naming the layer (eval never runs untrained kernels without a word)."""
    ov, out = trained
    meta = out / "layer_000.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "status": "stopped: non-finite"}))
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, "eval.methods=[less]")
    with pytest.raises(CheckpointNotFound):
        load_less(cfg, geo, "cpu", _policy(cfg))
    cfg = compose(*ov, f"less.ckpt={out}")
    with pytest.raises(LessctlError, match="layer 0 was not trained"):
        load_less(cfg, geo, "cpu", _policy(cfg))
    meta.unlink()
    with pytest.raises(LessctlError, match="layer_000.json is missing"):
        load_less(cfg, geo, "cpu", _policy(cfg))


def test_an_altered_or_garbled_kernels_file_is_refused_naming_it(trained, compose, tiny_model):
    from lessctl.shards import file_sha256

    ov, out = trained
    kern, meta = out / "layer_001.safetensors", out / "layer_001.json"
    rec = json.loads(meta.read_text())
    rec.setdefault("sha256", file_sha256(kern))  # as training records it
    meta.write_text(json.dumps(rec))
    data = bytearray(kern.read_bytes())
    data[-3] ^= 0xFF  # same size: only the checksum sees it
    kern.write_bytes(bytes(data))
    geo = attention_geometry(tiny_model[0])
    cfg = compose(*ov, f"less.ckpt={out}")
    with pytest.raises(LessctlError, match="layer_001.safetensors is corrupt .its sha256 differs"):
        load_less(cfg, geo, "cpu", _policy(cfg))
    kern.write_bytes(b"garbage")  # its sha256 recorded: a file that matches but does not parse
    meta.write_text(json.dumps({**rec, "sha256": file_sha256(kern)}))
    with pytest.raises(LessctlError, match="layer_001.safetensors cannot be read"):
        load_less(cfg, geo, "cpu", _policy(cfg))
