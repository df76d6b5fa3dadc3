"""One loader for every model source: embedded GGUF, tiny-random, a hub id, a local folder or .gguf.

`load_model(model_cfg, device, dtype) -> (model, tokenizer)`; the model is in eval mode with
frozen weights. Offline with no local copy, a hub model fails with one line that says how to
point `model.path` at a local copy.
"""

from __future__ import annotations

import json
import os
import socket
from functools import cache, partial
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


FAMILIES = ("llama", "mistral", "qwen2", "gemma2", "gemma3", "phi3", "falcon")


def tiny_config(family: str, cfg: Any):
    """A tiny config of ``family``'s own transformers config class (257 byte tokens).

    ``cfg``: hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    intermediate_size, max_position_embeddings, and ``sliding_window`` (the window of the
    sliding layers of mistral, qwen2, gemma2, gemma3 and phi3).
    """
    import transformers as tf

    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    window = get("sliding_window", None) or 16
    common = dict(
        vocab_size=257,
        hidden_size=get("hidden_size"),
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=get("num_attention_heads"),
        num_key_value_heads=get("num_key_value_heads"),
        intermediate_size=get("intermediate_size"),
        max_position_embeddings=get("max_position_embeddings"),
        eos_token_id=256,
        bos_token_id=256,
        pad_token_id=256,
        tie_word_embeddings=False,
    )
    n = common["num_hidden_layers"]
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=window)
    if family == "qwen2":  # q/k/v biases; the sliding window on for layers >= 1
        return tf.Qwen2Config(
            **common, use_sliding_window=True, sliding_window=window, max_window_layers=1
        )
    if family == "gemma2":  # alternating sliding/global layers, attention soft-capping
        return tf.Gemma2Config(
            **common,
            head_dim=common["hidden_size"] // common["num_attention_heads"],
            sliding_window=window,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=30.0,
            query_pre_attn_scalar=24,
        )
    if family == "gemma3":  # sliding/global layer types, one KV head, head_dim 256
        common["num_key_value_heads"] = 1
        return tf.Gemma3TextConfig(
            **common,
            head_dim=256,
            sliding_window=window,
            query_pre_attn_scalar=64,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)],
        )
    if family == "phi3":
        return tf.Phi3Config(**common, sliding_window=window)
    if family == "falcon":  # the 7B layout: multi-query, parallel attention, rotary
        return tf.FalconConfig(
            vocab_size=257,
            hidden_size=common["hidden_size"],
            num_hidden_layers=n,
            num_attention_heads=common["num_attention_heads"],
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            alibi=False,
            bias=False,
            max_position_embeddings=common["max_position_embeddings"],
            eos_token_id=256,
            bos_token_id=256,
        )
    raise ModelError(f"unknown model.family {family!r}; allowed: {', '.join(FAMILIES)}")


def tiny_random_model(cfg: Any, seed: int = 0):
    """A small model of ``cfg.family`` (default: a Llama with grouped-query attention) with
    seeded random weights."""
    from transformers import AutoModelForCausalLM

    get = cfg.get if hasattr(cfg, "get") else lambda k, d=None: getattr(cfg, k, d)
    config = tiny_config(get("family", None) or "llama", cfg)
    if getattr(config, "attn_logit_softcapping", None):
        config._attn_implementation = "eager"  # SDPA cannot soft-cap
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        # random init has tiny std; widen it so attention patterns are non-trivial
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.2)
    return model


def _from_pretrained(
    where: str | Path, revision: str | None, dtype: torch.dtype, device_map=None, **kw
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(where, revision=revision, **kw)
    if device_map is not None:  # accelerate places the layers (across GPUs, CPU)
        kw["device_map"] = device_map if isinstance(device_map, str) else dict(device_map)
    model = AutoModelForCausalLM.from_pretrained(where, revision=revision, dtype=dtype, **kw)
    return model, tok


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise ModelError(f"{what} {str(path)!r} cannot be read: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelError(f"{what} {str(path)!r} is not valid JSON (truncated?): {err}") from None


def check_safetensors(path: Path) -> None:
    """Refuse (one line) a .safetensors file whose size is not what its header says: an 8-byte
    header length, the JSON header, then every tensor's bytes (`data_offsets`)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = f.read(n) if 0 <= n <= size - 8 else b""
    try:
        meta = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise ModelError(
            f"weights file {str(path)!r} ({size} bytes) has no valid safetensors header: "
            "truncated or not a safetensors file"
        ) from None
    if 8 + n + end != size:
        raise ModelError(
            f"weights file {str(path)!r} has {size} bytes, its header says {8 + n + end}: "
            "truncated or damaged; copy it again"
        )


def check_folder(p: Path) -> None:
    """A local model folder: config.json an object with a `model_type` transformers knows, a
    tokenizer file, weights whose sizes match their headers; else one line naming the file."""
    from transformers import CONFIG_MAPPING

    cfg = _json(p / "config.json", "model config")
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if not isinstance(kind, str) or not kind:
        raise ModelError(
            f'model config {str(p / "config.json")!r} lacks `model_type` (e.g. "llama"): it is '
            "not a Hugging Face model config"
        )
    if kind not in CONFIG_MAPPING:
        raise ModelError(
            f"model config {str(p / 'config.json')!r}: model_type {kind!r} is not one this "
            "transformers knows (a newer transformers, or a model with custom code)"
        )
    if not any((p / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(
            f"model.path={str(p)!r} lacks a tokenizer: none of {', '.join(TOKENIZER_FILES)}"
        )
    shards = sorted(p.glob("*.safetensors"))
    if not shards and not any((p / f).exists() for f in WEIGHT_FILES):
        raise ModelError(f"model.path={str(p)!r} lacks weights: none of {', '.join(WEIGHT_FILES)}")
    for shard in shards:
        check_safetensors(shard)


def check_gguf(p: Path) -> None:
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ModelError(f"model.path={str(p)!r} is not a GGUF file (it does not start with GGUF)")


def _local(path: str, fp, where: Path, dtype: torch.dtype, **kw):
    """`fp(where, ...)` for a local model: a file it cannot read is one line naming the path
    (what `check_folder` does not foresee, e.g. a damaged .bin or GGUF)."""
    from safetensors import SafetensorError

    try:
        return fp(where, None, dtype, **kw)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelError(
            f"model.path={path!r} cannot be loaded ({type(err).__name__}: {first})"
        ) from None


def load_model(
    cfg: Any,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    attn_implementation: str = "sdpa",
):
    """Load the model described by a `model/` config. Returns `(model, tokenizer)`.

    ``model.device_map`` (e.g. ``auto``, or a module -> device mapping) is passed to
    ``from_pretrained`` (accelerate) so a model larger than one device loads across several;
    then ``device`` is not applied. Models that soft-cap attention logits run eagerly (the
    reference path; SDPA cannot soft-cap).
    """
    path = cfg.get("path")
    device_map = cfg.get("device_map")
    fp = partial(_from_pretrained, device_map=device_map)
    if path:
        p = Path(path).expanduser()
        if not p.exists():
            raise ModelError(f"model.path={path!r} does not exist")
        if p.suffix == ".gguf":
            check_gguf(p)
            model, tok = _local(path, fp, p.parent, dtype, gguf_file=p.name)
        elif (p / "config.json").exists():
            check_folder(p)
            model, tok = _local(path, fp, p, dtype)
        else:
            raise ModelError(
                f"model.path={path!r} is neither a .gguf file nor a folder with config.json"
            )
    elif cfg.source == "local":
        raise ModelError("model.source=local needs model.path=/a/folder or /a/file.gguf")
    elif cfg.source == "random":
        model, tok = tiny_random_model(cfg, seed=seed).to(dtype), byte_tokenizer()
    elif cfg.source == "embedded":
        model, tok = fp(assets.build_model(), None, dtype)
    elif cfg.source == "hub":
        if not hub_reachable():
            try:  # a copy in the local HF cache still works offline
                model, tok = fp(cfg.hub_id, cfg.get("revision"), dtype, local_files_only=True)
            except OSError:
                raise ModelError(
                    f"model {cfg.hub_id!r} cannot be reached on the Hugging Face hub from here "
                    f"and is not in the local HF cache; download it elsewhere and pass "
                    f"model.path=/local/folder"
                ) from None
        else:
            model, tok = fp(cfg.hub_id, cfg.get("revision"), dtype)
    else:
        raise ModelError(
            f"unknown model.source {cfg.source!r}; allowed: embedded, hub, random, local"
        )
    text = model.config.get_text_config(decoder=True)
    if getattr(text, "attn_logit_softcapping", None) and attn_implementation == "sdpa":
        attn_implementation = "eager"
    model.config._attn_implementation = attn_implementation
    if text is not model.config:
        text._attn_implementation = attn_implementation
    if device_map is None or cfg.source == "random":
        model.to(device)
    model.eval().requires_grad_(False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def attention_geometry(model) -> dict[str, int]:
    """Layers, query heads, KV heads, head dim of a decoder model; refuses (one line) models
    without them and models whose attention the harness cannot honour
    (:func:`lessctl.hooks.check_supported`)."""
    from lessctl.hooks import check_supported

    check_supported(model)
    c = model.config.get_text_config(decoder=True)
    try:
        n_layers = c.num_hidden_layers
        n_heads = c.num_attention_heads
    except AttributeError:
        raise ModelError(f"model {type(model).__name__} has no decoder attention layers") from None
    from lessctl.adapters import route_of
    from lessctl.hooks import attention_layers

    layer = attention_layers(model)[0]
    route = route_of(layer)  # e.g. multi-query Falcon: 1 KV head, whatever its config says
    n_kv = route.kv_heads(layer) if route else None
    n_kv = n_kv or getattr(c, "num_key_value_heads", None) or n_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // n_heads
    return dict(
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        max_position_embeddings=getattr(c, "max_position_embeddings", 0),
    )
