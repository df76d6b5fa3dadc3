"""One loader for every model source: embedded GGUF, tiny-random, a hub id, a local folder or .gguf.

`load_model(model_cfg, device, dtype) -> (model, tokenizer)`; the model is in eval mode with
frozen weights. Offline with no local copy, a hub model fails with one line that says how to
point `model.path` at a local copy.
"""

from __future__ import annotations

import os
import socket
from functools import cache
from pathlib import Path
from typing import Any

import torch

from lessctl import assets
from lessctl.errors import LessctlError


class ModelError(LessctlError):
    """A model that cannot be loaded; the message is one line."""


@cache
def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers a TCP connect (offline mode counts as no)."""
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + `<|endoftext|>`), for the tiny-random model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_random_model(cfg: Any, seed: int = 0):
    """A small Llama with grouped-query attention and seeded random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=257,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        eos_token_id=256,
        bos_token_id=256,
        pad_token_id=256,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        # random init has tiny std; widen it so attention patterns are non-trivial
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
    return model


def _from_pretrained(where: str | Path, revision: str | None, dtype: torch.dtype, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, revision=revision, **kw)
    model = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=dtype, **kw)
    return model, tok


def load_model(
    cfg: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """Load the model described by a `model/` config. Returns `(model, tokenizer)`."""
    path = cfg.get("path")
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelError(f"model.path={path!r} does not exist")
        if p.suffix == ".gguf":
            model, tok = _from_pretrained(p.parent, None, dtype, gguf_file=p.name)
        elif (p / "config.json").exists():
            model, tok = _from_pretrained(p, None, dtype)
        else:
            raise ModelError(
                f"model.path={path!r} is neither a .gguf file nor a folder with config.json"
            )
    elif cfg.source == "local":
        raise ModelError("model.source=local needs model.path=/a/folder or /a/file.gguf")
    elif cfg.source == "random":
        model, tok = tiny_random_model(cfg, seed=seed).to(dtype), byte_tokenizer()
    elif cfg.source == "embedded":
        model, tok = _from_pretrained(assets.build_model(), None, dtype)
    elif cfg.source == "hub":
        if not hub_reachable():
            try:  # a copy in the local HF cache still works offline
                model, tok = _from_pretrained(
                    cfg.hub_id, cfg.get("revision"), dtype, local_files_only=True
                )
            except OSError:
                raise ModelError(
                    f"model {cfg.hub_id!r} cannot be reached on the Hugging Face hub from here "
                    f"and is not in the local HF cache; download it elsewhere and pass "
                    f"model.path=/local/folder"
                ) from None
        else:
            model, tok = _from_pretrained(cfg.hub_id, cfg.get("revision"), dtype)
    else:
        raise ModelError(
            f"unknown model.source {cfg.source!r}; allowed: embedded, hub, random, local"
        )
    model.config._attn_implementation = attn_implementation
    model.to(device).eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def attention_geometry(model) -> dict[str, int]:
    """Layers, query heads, KV heads, head dim of a decoder model; refuses models without them."""
    c = model.config
    try:
        n_layers = c.num_hidden_layers
        n_heads = c.num_attention_heads
    except AttributeError:
        raise ModelError(f"model {type(model).__name__} has no decoder attention layers") from None
    n_kv = getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return dict(
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=getattr(c, "max_position_embeddings", 0),
    )
