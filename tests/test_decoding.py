"""generate(): left-padded batches equal single prompts, model.generate() equals the manual loop,
stop strings and EOS cut the output; the prompt protocol evicts down to the budget."""

from __future__ import annotations

import pytest
import torch

from lessctl.cache import EvictingCache
from lessctl.decoding import cut, generate
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.policies import get_policy

TEXTS = ["The quick brown fox jumps over the lazy dog, again and again", "Hello world, this is"]


def kernels_for(model) -> dict[int, LayerKernels]:
    c = model.config
    kc = KernelConfig(
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size // c.num_attention_heads,
        rank=4,
        hidden=32,
        dropout=0.0,
        init_scale=1.0,
    )
    with torch.random.fork_rng():
        torch.manual_seed(2)
        return {i: LayerKernels(kc).eval() for i in range(c.num_hidden_layers)}


def left_padded(tok):
    tok.padding_side = "left"
    return tok(TEXTS, return_tensors="pt", padding=True)


@pytest.mark.parametrize(
    "name,params,with_kernels",
    [
        ("lambda", dict(sink=2, recent=14), False),
        ("h2o", dict(heavy=8, recent=8), True),
        ("tova", dict(budget=16), True),
        ("snapkv", dict(heavy=4, window=6, pooling="max"), True),
    ],
)
def test_left_padded_batch_equals_each_alone(tiny_model, name, params, with_kernels):
    model, tok = tiny_model
    policy = get_policy(name, **params)
    kernels = kernels_for(model) if with_kernels else None
    enc = left_padded(tok)
    assert enc.attention_mask[1].sum() < enc.attention_mask[0].sum()  # really padded
    batch = generate(model, enc.input_ids, enc.attention_mask, policy, kernels, max_new_tokens=24)
    alone = [
        generate(
            model, tok(t, return_tensors="pt").input_ids, None, policy, kernels, max_new_tokens=24
        )[0]
        for t in TEXTS
    ]
    assert batch == alone
    assert all(len(x) > 0 for x in batch)


@pytest.mark.parametrize("protocol", ["prompt", "streaming"])
def test_hf_generate_with_the_cache_equals_manual_loop(tiny_model, protocol):
    model, tok = tiny_model
    policy, kernels = get_policy("h2o", heavy=6, recent=6), kernels_for(model)
    enc = left_padded(tok)
    manual = generate(
        model,
        enc.input_ids,
        enc.attention_mask,
        policy,
        kernels,
        max_new_tokens=20,
        protocol=protocol,
    )
    hf = generate(
        model,
        enc.input_ids,
        enc.attention_mask,
        policy,
        kernels,
        max_new_tokens=20,
        protocol=protocol,
        use_hf_generate=True,
    )
    assert manual == hf


def test_full_policy_matches_plain_model_generate(tiny_model):
    model, tok = tiny_model
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    ours = generate(model, ids, None, get_policy("full"), None, max_new_tokens=16)[0]
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=256)
    assert ours == [t for t in ref[0, ids.shape[1] :].tolist()][: len(ours)]
    # the evicting cache with budget >= the whole sequence is the full cache
    big = generate(model, ids, None, get_policy("recent", budget=512), None, max_new_tokens=16)
    assert big[0] == ours


def test_prompt_protocol_brings_the_cache_to_budget(tiny_model):
    model, tok = tiny_model
    n = 10
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    policy, kernels = get_policy("h2o", heavy=5, recent=5), kernels_for(model)
    cache = EvictingCache.for_model(model, policy, kernels, protocol="prompt")
    with cache.attached(model), torch.no_grad():
        out = model(ids, cache=cache, use_cache=True)
        assert all(layer.keys.shape[2] == ids.shape[1] for layer in cache.layers)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        model(nxt, cache=cache, use_cache=True)
    assert all(layer.keys.shape[2] == n for layer in cache.layers)
    assert all(layer.state.z.abs().sum() > 0 for layer in cache.layers)
    assert cache.get_seq_length() == ids.shape[1] + 1


def test_stop_string_cuts_the_output(tiny_model):
    model, tok = tiny_model
    policy = get_policy("lambda", sink=2, recent=14)
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    free = generate(model, ids, None, policy, None, max_new_tokens=30, tokenizer=tok)[0]
    text = tok.decode(free)
    stop = text[10:12]  # a string the free run produces after 10 characters
    assert stop and text.find(stop) >= 1
    cut_run = generate(
        model, ids, None, policy, None, max_new_tokens=30, tokenizer=tok, stop_strings=[stop]
    )[0]
    assert tok.decode(cut_run) == text[: text.find(stop)]
    assert len(cut_run) < len(free)


def test_cut_handles_eos_and_stop_strings(tiny_model):
    _, tok = tiny_model
    ids = tok("abc###def").input_ids
    assert cut(ids + [256, 1], {256}, None, tok) == (ids, True)
    assert tok.decode(cut(ids, {256}, ["###"], tok)[0]) == "abc"
    assert cut(ids, {256}, ["zzz"], tok) == (ids, False)


def test_sampling_is_reproducible_with_a_generator(tiny_model):
    model, tok = tiny_model
    ids = tok(TEXTS[1], return_tensors="pt").input_ids
    policy = get_policy("tova", budget=8)

    def run(seed):
        return generate(
            model,
            ids,
            None,
            policy,
            None,
            max_new_tokens=12,
            do_sample=True,
            temperature=0.7,
            generator=torch.Generator().manual_seed(seed),
        )

    assert run(0) == run(0)


def test_forced_tokens_are_fed_then_each_row_generates_up_to_its_limit(tiny_model):
    """With the full cache, feeding a suffix token by token after the prompt gives what the
    prompt with the suffix gives; rows with shorter suffixes start earlier; per-row limits hold;
    under an evicting policy the forced tokens pass through the cache (and so can change it)."""
    model, tok = tiny_model
    ids = tok(TEXTS[0], return_tensors="pt").input_ids
    head, tail = ids[:, :-5], ids[0, -5:].tolist()
    full = get_policy("full")
    whole = generate(model, ids, None, full, None, max_new_tokens=8)[0]
    forced = generate(model, head, None, full, None, max_new_tokens=[8], forced=[tail])[0]
    assert forced == whole and len(whole) == 8
    enc = left_padded(tok)
    pol = get_policy("h2o", heavy=4, recent=4)
    batch = generate(
        model,
        enc.input_ids,
        enc.attention_mask,
        pol,
        None,
        max_new_tokens=[6, 3],
        forced=[[5, 6, 7], []],
    )
    alone = [
        generate(
            model,
            tok(TEXTS[0], return_tensors="pt").input_ids,
            None,
            pol,
            None,
            max_new_tokens=6,
            forced=[[5, 6, 7]],
        )[0],
        generate(
            model, tok(TEXTS[1], return_tensors="pt").input_ids, None, pol, None, max_new_tokens=3
        )[0],
    ]
    assert batch == alone and [len(x) for x in batch] == [6, 3]
    with pytest.raises(ValueError, match="2 sequences but 1 limits"):
        generate(model, enc.input_ids, enc.attention_mask, pol, None, max_new_tokens=[4])
