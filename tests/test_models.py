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
