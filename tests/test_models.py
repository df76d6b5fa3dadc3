import pytest
import torch

from lessctl import models as M


def test_tiny_random_is_gqa_and_deterministic(compose, tiny_model):
    model, tok = tiny_model
    geo = M.attention_geometry(model)
    assert geo["num_heads"] == 4 and geo["num_kv_heads"] == 2 and geo["num_layers"] == 2
    again, _ = M.load_model(compose("model=tiny-random").model, seed=0)
    x = torch.tensor([tok("seeded weights").input_ids])
    torch.testing.assert_close(model(x).logits, again(x).logits)


def test_byte_tokenizer_round_trip():
    tok = M.byte_tokenizer()
    assert tok.decode(tok("naïve café").input_ids) == "naïve café"


def test_hub_model_offline_is_one_line(compose, monkeypatch):
    monkeypatch.setattr(M, "hub_reachable", lambda: False)
    cfg = compose("model=llama2-7b", "model.hub_id=lessctl-test/does-not-exist").model
    with pytest.raises(M.ModelError) as e:
        M.load_model(cfg)
    assert "model.path" in str(e.value) and "\n" not in str(e.value)


def test_missing_local_path(compose, tmp_path):
    with pytest.raises(M.ModelError, match="does not exist"):
        M.load_model(compose(f"model.path={tmp_path}/nothing").model)
    with pytest.raises(M.ModelError, match="neither"):
        M.load_model(compose(f"model.path={tmp_path}").model)


@pytest.mark.slow
def test_embedded_smollm2_perplexity(smollm2):
    model, tok = smollm2
    text = (
        "The history of the city begins in the early medieval period, when a small settlement "
        "grew around a river crossing. Over the following centuries, trade brought merchants "
        "and craftsmen, and the town became known for its markets and its cathedral. In the "
        "nineteenth century, the arrival of the railway transformed the local economy."
    )
    x = tok(text, return_tensors="pt").input_ids
    ppl = torch.exp(model(x, labels=x).loss).item()
    assert 1.0 < ppl < 50.0


@pytest.fixture(scope="module")
def saved_tiny(tiny_model, tmp_path_factory):
    """The tiny random model saved as a Hugging Face folder (config, tokenizer, safetensors)."""
    model, tok = tiny_model
    path = tmp_path_factory.mktemp("tiny-hf")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_saved_folder_loads_and_equals_the_model(compose, saved_tiny, tiny_model):
    model, _ = M.load_model(compose(f"model.path={saved_tiny}").model)
    ids = torch.arange(1, 20)[None]
    torch.testing.assert_close(model(ids).logits, tiny_model[0](ids).logits)


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda p: (p / "config.json").write_text("{}"), "config.json' lacks `model_type`"),
        (lambda p: (p / "config.json").write_text('{"model_type": "lla'), "is not valid JSON"),
        (lambda p: (p / "config.json").write_text("[1]"), "config.json' lacks `model_type`"),
        (
            lambda p: (p / "config.json").write_text('{"model_type": "nope"}'),
            "model_type 'nope' is not one this transformers knows",
        ),
        (lambda p: (p / "tokenizer.json").unlink(), "lacks a tokenizer: none of tokenizer.json"),
        (lambda p: (p / "model.safetensors").unlink(), "lacks weights: none of model.safetensors"),
        (
            lambda p: (p / "model.safetensors").write_bytes(
                (p / "model.safetensors").read_bytes()[:-100]
            ),
            "model.safetensors' has ",
        ),
        (
            lambda p: (p / "model.safetensors").write_bytes(
                b"garbage!" + (p / "model.safetensors").read_bytes()[8:]
            ),
            "model.safetensors' (",
        ),
    ],
)
def test_a_broken_model_folder_is_one_line_naming_the_file(
    compose, saved_tiny, tmp_path, damage, needle
):
    """An empty config.json was a 120-line traceback whose hint (install sentencepiece)
    misled; a truncated config or weights file was a traceback too."""
    path = _copy(saved_tiny, tmp_path / "m")
    damage(path)
    with pytest.raises(M.ModelError) as e:
        M.load_model(compose(f"model.path={path}").model)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and needle in msg, msg
    assert "sentencepiece" not in msg


def test_weights_that_do_not_fit_the_config_are_one_line(compose, saved_tiny, tmp_path):
    """What the checks before loading cannot see, transformers refuses; that is one line too."""
    import json

    path = _copy(saved_tiny, tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(M.ModelError, match=r"model.path='.*/m' cannot be loaded \(RuntimeError"):
        M.load_model(compose(f"model.path={path}").model)


def test_a_file_that_is_not_gguf_is_one_line(compose, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"\0" * 64)
    with pytest.raises(M.ModelError, match="is not a GGUF file"):
        M.load_model(compose(f"model.path={fake}").model)
