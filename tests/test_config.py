import pytest

from lessctl.config import ConfigError, group_options, groups, load_config, resolve_dtype


def test_groups_exist():
    assert {"model", "data", "policy", "less", "experiment"} <= set(groups())


@pytest.mark.parametrize("group", ["model", "data", "policy", "less", "experiment"])
def test_every_option_composes(group):
    options = group_options(group)
    assert options, f"group {group} has no options"
    for opt in options:
        cfg = load_config([f"{group}={opt}"])
        if group in ("model", "data", "policy"):
            assert cfg[group].name == opt


def test_required_options_present():
    assert {
        "smollm2-135m",
        "tiny-random",
        "llama2-7b",
        "llama2-13b",
        "falcon-7b",
        "mistral-7b",
    } <= set(group_options("model"))
    assert {"c4", "wikitext2", "wikitext103", "pg19", "cnndm", "xsum", "multinews"} <= set(
        group_options("data")
    )
    assert {"smoke", "cpu", "paper"} <= set(group_options("experiment"))


def test_defaults(compose):
    cfg = compose()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.device == "auto" and cfg.dtype == "auto"


def test_unknown_option_lists_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(["model=nope"])
    msg = str(e.value)
    assert "\n" not in msg and "'nope'" in msg and "tiny-random" in msg and "llama2-7b" in msg


def test_unknown_key_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(["not_a_key=1"])
    assert "\n" not in str(e.value) and "not_a_key" in str(e.value)


def test_not_an_override():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(["justaword"])


def test_dtype_resolution():
    import torch

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with pytest.raises(ConfigError, match="allowed"):
        resolve_dtype("float8", torch.device("cpu"))


@pytest.mark.parametrize(
    "override,allowed",
    [
        ("train.epochs=0", "an int >= 1"),
        ("threads=0", "an int >= 1"),
        ("extract.tokens=0", "an int >= 1"),
        ("eval.shots=-1", "an int >= 0"),
        ("eval.mode=fast", "parallel, streaming"),
        ("train.val_fraction=1.5", "(0.0, 1.0)"),
        ("less.dropout=1.0", "[0.0, 1.0)"),
        ("less.kind=mystery", "hedgehog, learned, light, performer"),
        ("less.transfer=maybe", "true or false"),
        ("bench.contexts=[0,64]", "a non-empty list, each an int >= 2"),
        ("device=gpu", "auto, cpu, cuda, cuda:N, mps"),
        ("dtype=float8", "auto, float32"),
        ("seed=abc", "an int >= 0"),
    ],
)
def test_bad_values_are_refused_where_they_enter(override, allowed):
    from lessctl.schema import SchemaError

    key, value = override.split("=", 1)
    with pytest.raises(SchemaError) as e:
        load_config([override])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{key}=") and value[:3] in msg and allowed in msg


def test_every_schema_key_exists_in_the_defaults(compose):
    from omegaconf import OmegaConf

    from lessctl.schema import SCHEMA

    cfg = compose()
    missing = [f.key for f in SCHEMA if OmegaConf.select(cfg, f.key, default="<none>") == "<none>"]
    assert missing == []


def test_unavailable_device_is_one_line(monkeypatch):
    import torch

    from lessctl.config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(
        ConfigError, match=r"device='cuda' is not available .*allowed here: auto, cpu"
    ):
        resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"


@pytest.mark.parametrize("model", ["smollm2-135m", "llama2-7b", "tiny-random"])
def test_bare_defaults_make_a_coherent_study(compose, model):
    """Bare `extract`/`train`/`eval` train and evaluate at the same budget, well inside the
    training sequences (was: a 409-token budget on 512-token sequences for SmolLM2)."""
    from lessctl.policies import build_policy

    cfg = compose(f"model={model}")
    max_pos = cfg.model.max_position_embeddings
    train_len = int(cfg.extract.seq_len)
    eval_len = int(cfg.eval.window or max_pos)
    train = build_policy(cfg.policy, seq_len=train_len, max_position_embeddings=max_pos)
    evaluated = build_policy(cfg.policy, seq_len=eval_len, max_position_embeddings=max_pos)
    assert train == evaluated and train_len == eval_len
    assert train.budget <= train_len // 4
    assert int(cfg.extract.tokens) // train_len >= 2 * int(cfg.extract.batch_size)  # >= 2 chunks
