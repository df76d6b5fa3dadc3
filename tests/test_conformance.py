"""Architecture conformance: every family the configs list, held to one contract.

Tiny random models built in code from each family's own transformers config class (no
downloads), fp32. The model's own attention is the reference:

1. nothing evicted == the model (parallel form, streaming protocol, prompt protocol through
   ``generate()``), logits within 1e-4;
2. causality for every method;
3. routing: our attention function runs on every decoder layer (Falcon, whose attention calls
   SDPA inline, through its route in ``lessctl.adapters``); a model it cannot reach (Falcon
   without its route) and ALiBi models are refused in one line, by every stage;
4. what a layer cannot see is neither kept nor folded into the state: sliding windows (the
   policy chooses inside the window; a window within the budget evicts nothing), soft-capping
   and the model's own scale, in the sparse part, the state and the training targets;
5. extract -> train -> eval -> bench on each family (``test_pipeline``).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from typer.testing import CliRunner

import lessctl.decoding as decoding
from lessctl.cache import EvictingCache
from lessctl.cli import app
from lessctl.decoding import generate, stream_logits
from lessctl.extract import Capture
from lessctl.hooks import (
    UnsupportedModel,
    attention_layers,
    check_supported,
    sdpa,
    use_attention,
)
from lessctl.less.attention import masked_attention
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.methods import ParallelAttention
from lessctl.models import attention_geometry, tiny_random_model
from lessctl.policies import baseline_plus, get_policy, keep_mask
from lessctl.policies.base import capped, default_scale, layer_evict_at
from lessctl.train import full_attention

FAMILIES = ["llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "falcon"]
SLIDING = ["mistral", "qwen2", "gemma2", "gemma3", "phi3"]
ALL_LAYERS_SLIDE = ["mistral", "phi3"]
WINDOW, S = 8, 20
TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    sliding_window=WINDOW,
)
NOTHING_EVICTED = get_policy("h2o", heavy=16, recent=16)  # budget 32 > every length here
EVICTING = get_policy("h2o", heavy=3, recent=3)  # budget 6 < window 8 < S


@functools.cache
def model_of(family: str, **extra):
    model = tiny_random_model({**TINY, "family": family, **extra}).eval().requires_grad_(False)
    if not getattr(model.config, "attn_logit_softcapping", None):
        model.config._attn_implementation = "sdpa"
    return model


@functools.cache
def views_of(family: str) -> list[dict]:
    return check_supported(model_of(family))


def ids_of(seed: int = 0, n: int = S) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def kernels_for(model, scale: float = 1.0) -> dict[int, LayerKernels]:
    """Untrained learned kernels with a large init so the state changes the output."""
    geo = attention_geometry(model)
    kc = KernelConfig(
        geo["num_heads"], geo["num_kv_heads"], geo["head_dim"], 4, 32, 0.0, scale, seed=3
    )
    with torch.random.fork_rng():
        torch.manual_seed(3)
        return {i: LayerKernels(kc).eval() for i in range(geo["num_layers"])}


def parallel_logits(model, ids, policy, kernels=None) -> torch.Tensor:
    with use_attention(model, ParallelAttention(policy, kernels)), torch.no_grad():
        return model(ids).logits


def own_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def prompt_logits(model, monkeypatch, ids, policy, kernels=None, new: int = 6) -> torch.Tensor:
    """Logits of every decoding step of ``generate()`` (prompt protocol)."""
    seen = []
    real = decoding._next_token

    def spy(logits, *a, **kw):
        seen.append(logits.clone())
        return real(logits, *a, **kw)

    monkeypatch.setattr(decoding, "_next_token", spy)
    generate(model, ids, None, policy, kernels, max_new_tokens=new, protocol="prompt")
    monkeypatch.setattr(decoding, "_next_token", real)
    return torch.stack(seen)


# ---- the families really have the features the table claims ---------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_family_has_the_features_it_stands_for(family):
    views = views_of(family)
    geo = attention_geometry(model_of(family))
    windows = [v["window"] for v in views]
    if family in ALL_LAYERS_SLIDE:
        assert windows == [WINDOW, WINDOW]
    elif family in SLIDING:  # sliding and global layers
        assert sorted(windows, key=str) == [WINDOW, None]
    else:
        assert windows == [None, None]
    if family == "gemma2":
        assert all(v["softcap"] == 5.0 for v in views)
    if family in ("gemma2", "gemma3"):  # query_pre_attn_scalar, not head_dim, sets the scale
        assert all(abs(v["scaling"] - default_scale(geo["head_dim"], None)) > 1e-3 for v in views)
    if family == "gemma3":
        assert geo["num_kv_heads"] == 1 and geo["head_dim"] == 256
    if family == "qwen2":
        assert attention_layers(model_of(family))[0].q_proj.bias is not None
    if family == "llama":
        assert geo["num_kv_heads"] < geo["num_heads"]
    if family == "falcon":  # the 7B layout: multi-query (one KV head), parallel attention
        cfg = model_of(family).config
        assert cfg.multi_query and cfg.parallel_attn and not cfg.new_decoder_architecture
        assert geo["num_kv_heads"] == 1 and not cfg.alibi


# ---- 1. nothing evicted == the model ---------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_nothing_evicted_equals_the_model(family, monkeypatch):
    model, ids = model_of(family), ids_of()
    ref = own_logits(model, ids)
    kern = kernels_for(model)
    assert torch.allclose(parallel_logits(model, ids, NOTHING_EVICTED), ref, atol=1e-4)
    assert torch.allclose(parallel_logits(model, ids, NOTHING_EVICTED, kern), ref, atol=1e-4)
    assert torch.allclose(stream_logits(model, ids, NOTHING_EVICTED, kern, chunk=5), ref, atol=1e-4)
    full = prompt_logits(model, monkeypatch, ids[:, :12], get_policy("full"))
    ours = prompt_logits(model, monkeypatch, ids[:, :12], NOTHING_EVICTED, kern)
    assert full.shape[0] == 6 and torch.allclose(ours, full, atol=1e-4)


@pytest.mark.parametrize("family", ALL_LAYERS_SLIDE)
def test_window_within_the_budget_evicts_nothing(family, monkeypatch):
    """Budget 12 >= window 8, 20 tokens: every protocol equals the model (a policy that kept a
    key past the window, or folded one into the state, would not)."""
    model, ids, pol = model_of(family), ids_of(1), get_policy("h2o", heavy=6, recent=6)
    kern = kernels_for(model)
    ref = own_logits(model, ids)
    assert torch.allclose(parallel_logits(model, ids, pol, kern), ref, atol=1e-4)
    assert torch.allclose(stream_logits(model, ids, pol, kern, chunk=5), ref, atol=1e-4)
    full = prompt_logits(model, monkeypatch, ids[:, :14], get_policy("full"))
    ours = prompt_logits(model, monkeypatch, ids[:, :14], pol, kern)
    assert torch.allclose(ours, full, atol=1e-4)


# ---- 2. causality --------------------------------------------------------------------------


def _methods(model):
    plus = baseline_plus(EVICTING, 4, attention_geometry(model)["head_dim"], kv_bytes=4)
    kern = kernels_for(model)
    return {
        "baseline": (EVICTING, None),
        "baseline_plus": (plus, None),
        "less": (EVICTING, kern),
        "less_tova": (get_policy("tova", budget=5), kern),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_for_every_method(family):
    model, ids, t = model_of(family), ids_of(2), 13
    other = ids.clone()
    other[0, t] = (other[0, t] + 7) % 256
    runs = {"full": (own_logits(model, ids), own_logits(model, other))}
    for name, (pol, kern) in _methods(model).items():
        runs[name] = (
            parallel_logits(model, ids, pol, kern),
            parallel_logits(model, other, pol, kern),
        )
    for name, (a, b) in runs.items():
        assert torch.equal(a[:, :t], b[:, :t]) or torch.allclose(a[:, :t], b[:, :t], atol=1e-4), (
            name
        )
        assert not torch.allclose(a[:, t:], b[:, t:], atol=1e-3), name


# ---- 3. routing and refusals ---------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_our_attention_runs_on_every_layer(family):
    model, calls = model_of(family), []
    inner = ParallelAttention(EVICTING, kernels_for(model))

    def counted(module, *a, **kw):
        calls.append(module.layer_idx)
        return inner(module, *a, **kw)

    with use_attention(model, counted), torch.no_grad():
        model(ids_of())
    assert sorted(calls) == list(range(TINY["num_hidden_layers"]))


@pytest.fixture
def without_routes(monkeypatch):
    """As if lessctl had no adapter for modules that call SDPA inline (Falcon)."""
    import lessctl.adapters as adapters

    monkeypatch.setattr(adapters, "ROUTES", {})


def test_a_model_our_function_cannot_reach_is_refused_in_one_line(without_routes):
    falcon = tiny_random_model({**TINY, "family": "falcon"}).eval()
    with pytest.raises(UnsupportedModel, match=r"^model type falcon: .* reaches 0 of 2") as err:
        attention_geometry(falcon)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout", ["new_decoder_architecture", "multi_head"])
def test_other_falcon_layouts_equal_the_model(layout):
    """Falcon-40B's grouped layout (KV heads with their query groups) and the plain multi-head
    one: nothing evicted equals the model, and keys reach the policy per KV head."""
    from transformers import FalconConfig, FalconForCausalLM

    extra = (
        {"new_decoder_architecture": True, "num_kv_heads": 2}
        if layout == "new_decoder_architecture"
        else {"multi_query": False}
    )
    cfg = FalconConfig(
        vocab_size=257, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **extra
    )
    torch.manual_seed(0)
    model = FalconForCausalLM(cfg).eval().requires_grad_(False)
    geo = attention_geometry(model)
    assert geo["num_kv_heads"] == (2 if layout == "new_decoder_architecture" else 4)
    ids = ids_of()
    kern = kernels_for(model)
    ref = own_logits(model, ids)
    assert torch.allclose(parallel_logits(model, ids, NOTHING_EVICTED, kern), ref, atol=1e-4)
    assert torch.allclose(stream_logits(model, ids, NOTHING_EVICTED, kern, chunk=5), ref, atol=1e-4)
    assert not torch.allclose(parallel_logits(model, ids, EVICTING, kern), ref, atol=1e-3)
    with use_attention(model, sdpa), torch.no_grad():  # extract's capture path: transformers' SDPA
        assert torch.allclose(model(ids).logits, ref, atol=1e-4)


def test_routes_restore_what_the_module_had():
    """Leaving a block restores the module's own forward (and any instance attribute it had,
    e.g. an outer block's route); nested blocks keep routing."""
    model = model_of("falcon")
    layer = attention_layers(model)[0]
    hook = layer.forward  # a bound method of the class
    ids, ref = ids_of(), own_logits(model, ids_of())
    with use_attention(model, sdpa):
        outer = layer.forward
        with use_attention(model, sdpa), torch.no_grad():
            assert torch.allclose(model(ids).logits, ref, atol=1e-4)
        assert layer.forward == outer and layer.num_key_value_groups == 4
    assert "forward" not in vars(layer) and "num_key_value_groups" not in vars(layer)
    assert layer.forward == hook


def test_blocks_leave_no_registered_functions_behind():
    """Each block registers its function and mask under a fresh name; leaving it (also by an
    exception) removes both, so a long study does not grow transformers' global tables."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    model = model_of("llama")
    before = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))
    with use_attention(model, sdpa) as name:
        assert name in AttentionInterface._global_mapping
        assert name in AttentionMaskInterface._global_mapping
    with pytest.raises(RuntimeError), use_attention(model, sdpa):
        raise RuntimeError("boom")
    after = (set(AttentionInterface._global_mapping), set(AttentionMaskInterface._global_mapping))
    assert after == before
    assert model.config._attn_implementation not in (name,)


def test_alibi_is_refused_naming_the_feature():
    from transformers import BloomConfig, BloomForCausalLM, FalconConfig, FalconForCausalLM

    falcon = FalconForCausalLM(
        FalconConfig(
            vocab_size=257, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, alibi=True
        )
    )
    with pytest.raises(UnsupportedModel, match=r"model type falcon: ALiBi"):
        attention_geometry(falcon)

    bloom = BloomForCausalLM(BloomConfig(vocab_size=257, hidden_size=32, n_layer=1, n_head=2))
    with pytest.raises(UnsupportedModel, match=r"model type bloom: ALiBi"):
        attention_geometry(bloom)


@pytest.mark.parametrize("stage", ["eval", "bench", "extract"])
def test_every_stage_refuses_an_unreachable_model(stage, tmp_path, monkeypatch, without_routes):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text("some text " * 200)
    res = CliRunner().invoke(
        app,
        [
            stage,
            "experiment=smoke",
            "model.family=falcon",
            f"data.path={tmp_path / 't.txt'}",
        ],
    )
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "model type falcon" in lines[0], res.output
    assert not list(tmp_path.glob("**/rows.jsonl"))  # nothing was evaluated


# ---- 4. what a layer cannot see --------------------------------------------------------------


def _layer_inputs(model, ids) -> dict[int, tuple]:
    """Each layer's q, k, v and view as the model passes them."""
    got = {}

    def rec(module, q, k, v, mask, scaling=None, sliding_window=None, softcap=None, **kw):
        got[module.layer_idx] = (q, k, v, scaling, sliding_window, softcap)
        return ParallelAttention(get_policy("full"))(
            module, q, k, v, mask, scaling, sliding_window, softcap
        )

    with use_attention(model, rec), torch.no_grad():
        model(ids)
    return got


def _tova_reference(q, k, n, w, scale, softcap, per_head=False) -> torch.Tensor:
    """Independent loop (one batch row): TOVA inside a sliding window -> evict_at [Hkv,S]; one
    set for the layer from every head's probabilities (``per_head``: one set per KV head)."""
    _, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = torch.full((hkv, s), s, dtype=torch.long)
    for sets in [[x] for x in range(hkv)] if per_head else [list(range(hkv))]:
        kept: list[int] = []
        for t in range(s):
            if t - w in kept:  # expires, whatever the policy thinks
                kept.remove(t - w)
                out[sets, t - w] = t
                kept.append(t)
                continue
            kept.append(t)
            if len(kept) > n:
                p = 0.0
                for head in sets:
                    qs = q[0, head * g : (head + 1) * g, t].double()  # [g,d]
                    logit = capped(qs @ k[0, head, kept].double().T * scale, softcap)
                    p = p + logit.softmax(-1).sum(0)[:-1]
                j = kept[int(torch.argmin(p))]
                kept.remove(j)
                out[sets, j] = t
    return out


def _h2o_reference(q, k, heavy, recent, w, scale, softcap) -> torch.Tensor:
    """Independent loop (one batch row): H2O inside a sliding window -> evict_at [Hkv,S]."""
    _, h, s, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    out = torch.full((hkv, s), s, dtype=torch.long)
    for head in range(hkv):
        kept: list[int] = []
        acc = torch.zeros(s, dtype=torch.float64)
        for t in range(s):
            if t - w in kept:
                kept.remove(t - w)
                out[head, t - w] = t
            elif len(kept) + 1 > heavy + recent:
                old = [j for j in kept if j <= t - recent]
                j = min(old, key=lambda j: (float(acc[j]), j))
                kept.remove(j)
                out[head, j] = t
            kept.append(t)
            qs = q[0, head * g : (head + 1) * g, t].double()
            logit = capped(qs @ k[0, head, kept].double().T * scale, softcap)
            acc[kept] += logit.softmax(-1).sum(0)
    return out


@pytest.mark.parametrize("family", SLIDING)
def test_policy_chooses_inside_the_window(family):
    model = model_of(family)
    for q, k, _v, scaling, window, softcap in _layer_inputs(model, ids_of(3)).values():
        if window is None:
            continue
        ev = layer_evict_at(get_policy("tova", budget=5), q, k, scaling, window, softcap)
        ref = _tova_reference(q, k, 5, window, scaling, softcap)
        assert torch.equal(ev[0], ref)
        per_head = get_policy("tova", budget=5, per_head=True)
        ev_ph = layer_evict_at(per_head, q, k, scaling, window, softcap)
        assert torch.equal(ev_ph[0], _tova_reference(q, k, 5, window, scaling, softcap, True))
        ev_h2o = layer_evict_at(EVICTING, q, k, scaling, window, softcap)
        assert torch.equal(ev_h2o[0], _h2o_reference(q, k, 3, 3, window, scaling, softcap))
        keep = keep_mask(ev)[0]  # [Hkv,S,S]
        t = torch.arange(S)
        assert not (keep & (t[None, :] <= t[:, None] - window)).any()  # nothing outside
        assert (keep.sum(-1)[:, 5:] == 5).all()  # budget full at every row


@pytest.mark.parametrize("family", SLIDING)
def test_budget_below_window_matches_the_masked_reference(family):
    """Per layer, the parallel form (sparse part + windowed state) equals the quadratic
    reference that masks window AND policy, with the layer's scale and soft-capping; the
    real-eviction cache equals the parallel form."""
    model, ids = model_of(family), ids_of(4)
    kern = kernels_for(model)
    for i, (q, k, v, scaling, window, softcap) in _layer_inputs(model, ids).items():
        phi, psi = kern[i].phi(q), kern[i].psi(k)
        ev = layer_evict_at(EVICTING, q, k, scaling, window, softcap)
        ref = masked_attention(q, k, v, ev, phi, psi, scaling, window, softcap)
        got = ParallelAttention(EVICTING, kern)(
            attention_layers(model)[i], q, k, v, None, scaling, window, softcap
        )[0].transpose(1, 2)
        assert torch.allclose(got, ref, atol=1e-5), i
        if window is not None:  # the state forgets keys that left the window
            stale = masked_attention(q, k, v, ev, phi, psi, scaling, None, softcap)
            assert not torch.allclose(got, stale, atol=1e-4)
    par = parallel_logits(model, ids, EVICTING, kern)
    assert torch.allclose(stream_logits(model, ids, EVICTING, kern, chunk=5), par, atol=1e-4)
    # one-token forwards: once full, the steady step (folded keys leave the state in place)
    assert torch.allclose(stream_logits(model, ids, EVICTING, kern, chunk=1), par, atol=1e-4)
    assert not torch.allclose(par, own_logits(model, ids), atol=1e-2)  # it really evicts


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "mistral", "qwen2"])
def test_training_target_is_the_layers_own_attention(family):
    """extract's capture + train's target reproduce each layer's own output (scale, window,
    soft-capping), measured at the input of o_proj."""
    model, ids = model_of(family), ids_of(5)
    own = {}
    hooks = [
        m.o_proj.register_forward_pre_hook(
            lambda mod, a, i=m.layer_idx: own.__setitem__(i, a[0].detach())
        )
        for m in attention_layers(model)
    ]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    cap = Capture(torch.float32)
    with use_attention(model, cap), torch.no_grad():
        model(ids)
    for i, view in enumerate(views_of(family)):
        s = cap.seen[i]
        tgt = full_attention(
            s["q"], s["k"], s["v"], view["scaling"], view["window"], view["softcap"]
        )
        tgt = tgt.transpose(1, 2).reshape(own[i].shape)
        assert torch.allclose(tgt, own[i], atol=1e-5), i


# ---- 5. extract -> train -> eval -> bench -------------------------------------------------


@pytest.mark.parametrize(
    "family",
    [pytest.param(f, marks=[] if f == "gemma2" else pytest.mark.slow) for f in FAMILIES],
)
def test_pipeline(family, tmp_path, monkeypatch):
    monkeypatch.setenv("LESSCTL_CACHE", str(tmp_path / "cache"))
    (tmp_path / "t.txt").write_text(
        " ".join(f"Line {i}: the river rose after the storm, and boats moved." for i in range(60))
    )
    ov = [
        "experiment=smoke",
        f"model.family={family}",
        f"model.sliding_window={WINDOW * 2}",
        f"data.path={tmp_path / 't.txt'}",
        "train.epochs=1",
        "extract.tokens=768",
        "eval.windows=1",
    ]
    runner = CliRunner()
    for stage in ("extract", "train"):
        res = runner.invoke(app, [stage, *ov])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", *ov, "eval.methods=[full,baseline,less]"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for p in tmp_path.glob("**/rows.jsonl") for x in p.open()]
    assert {"full", "baseline", "less"} <= {r.get("method") for r in rows}, rows
    res = runner.invoke(app, ["bench", *ov, "bench.contexts=[32]"])
    assert res.exit_code == 0, res.output
    bench = [json.loads(x) for p in tmp_path.glob("**/rows.jsonl") for x in p.open()]
    assert len(bench) > len(rows)


@pytest.mark.parametrize("family", ["mistral", "gemma2"])
def test_prompt_protocol_keeps_only_the_window(family):
    """After a prompt of 14 tokens and one decoded row with budget 6 < window 8, a sliding
    layer holds 6 keys, all inside the window, and its state only keys that are inside it too;
    a left-padded batch decodes exactly as each sequence alone."""
    model, kern = model_of(family), kernels_for(model_of(family))
    views = views_of(family)
    ids = ids_of(6, 14)
    cache = EvictingCache.for_model(model, EVICTING, kern, protocol="prompt")
    with cache.attached(model), torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        model(ids[:, :1], cache=cache, use_cache=True, position_ids=torch.tensor([[14]]))
    for layer, view in zip(cache.layers, views, strict=True):
        pos = layer.positions
        assert ((pos >= 0).sum(-1) == 6).all()
        if view["window"] is not None:
            assert (pos > 14 - view["window"]).all()
            assert (
                layer.store.fpos is not None
                and (layer.store.fpos[layer.store.fpos >= 0] > 14 - WINDOW).all()
            )
    a, b = ids_of(7, 15)[0], ids_of(8, 11)[0]
    batch = torch.full((2, 15), 256)
    batch[0], batch[1, 4:] = a, b
    mask = (batch != 256).long()
    both = generate(model, batch, mask, EVICTING, kern, max_new_tokens=10)
    alone = [generate(model, x[None], None, EVICTING, kern, max_new_tokens=10)[0] for x in (a, b)]
    assert both == alone


def test_device_map_passes_through_to_accelerate(tmp_path, monkeypatch):
    """`model.device_map` reaches from_pretrained (accelerate places the modules; here all on
    CPU, the only device) and the evicting cache and kernels run on the placed model. A real
    multi-device split cannot be tested on this CPU-only machine."""
    from lessctl.models import byte_tokenizer, load_model

    src = model_of("mistral")
    src.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    import transformers

    seen, real = [], transformers.AutoModelForCausalLM.from_pretrained

    def spy(*a, **kw):
        seen.append(kw.get("device_map"))
        return real(*a, **kw)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    cfg = {"source": "local", "path": str(tmp_path / "m"), "device_map": "auto"}
    model, _ = load_model(_Cfg(cfg), "cpu", torch.float32)
    assert seen == ["auto"]
    ids, kern = ids_of(9, 12), kernels_for(model)
    par = parallel_logits(model, ids, EVICTING, kern)
    assert torch.allclose(par, parallel_logits(src, ids, EVICTING, kern), atol=1e-5)
    assert torch.allclose(stream_logits(model, ids, EVICTING, kern, chunk=4), par, atol=1e-4)


class _Cfg(dict):
    """A dict with attribute access (what load_model reads from a model config)."""

    __getattr__ = dict.get
