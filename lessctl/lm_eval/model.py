"""lessctl's methods as an lm-evaluation-harness model, registered as `lessctl`.

`LessctlLM` is lm-eval's own `HFLM` with two calls replaced:

- `_model_call` (log-likelihood and rolling log-likelihood requests): the teacher-forced forward
  pass runs with the method's `ParallelAttention` (the policy's evictions and the LESS state, the
  paper's protocol), as `lessctl.tasks.perplexity.method_nll` applies a method; `full` is the
  unmodified model;
- `_model_generate` (generation requests): `lessctl.decoding.generate` through the
  real-eviction cache in the prompt protocol (the prompt with full attention, eviction as tokens
  are decoded).

Everything else (tokenisation, batching, rolling windows, metrics) is lm-eval's. Model arguments
(`--model_args`) pick the model and method; keys with a dot are lessctl config overrides:

    model=smollm2-135m,method=less,policy=h2o,budget=32,ckpt=PATH,max_length=512,less.rank=8

`budget=` is `policy.budget.size`, `ckpt=` is `less.ckpt`, `dtype=`/`device=`/`seed=` are the
lessctl keys; `max_length` (default: the model's `max_position_embeddings`) is lm-eval's window,
and the budget of a fractional policy is relative to it.
"""

from __future__ import annotations

from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from lessctl.decoding import generate
from lessctl.errors import LessctlError
from lessctl.hooks import use_attention
from lessctl.methods import METHODS, Method, ParallelAttention, build_methods

SHORTHANDS = {
    "model": "model",
    "policy": "policy",
    "budget": "policy.budget.size",
    "budget_of": "policy.budget.of",
    "ckpt": "less.ckpt",
    "device": "device",
    "dtype": "dtype",
    "seed": "seed",
}


def lessctl_overrides(args: dict[str, Any]) -> list[str]:
    """Model arguments -> lessctl config overrides (shorthands and dotted keys)."""
    out = []
    for key, value in args.items():
        if value is None:
            continue
        if key in SHORTHANDS:
            out.append(f"{SHORTHANDS[key]}={value}")
        elif "." in key:
            out.append(f"{key}={value}")
        else:
            allowed = ", ".join(["method", "max_length", "batch_size", *SHORTHANDS])
            raise LessctlError(
                f"unknown lessctl model argument {key!r}; allowed: {allowed}, or a dotted "
                f"lessctl config key (e.g. less.rank=8)"
            )
    return out


@register_model("lessctl")
class LessctlLM(HFLM):
    """An `HFLM` that evaluates one lessctl method (see the module docstring)."""

    def __init__(
        self,
        pretrained=None,
        tokenizer=None,
        method: str | Method = "full",
        max_length: int | None = None,
        batch_size: int | str | None = 1,
        cfg=None,
        **kwargs: Any,
    ) -> None:
        from lessctl.config import load_config, resolve_device, resolve_dtype
        from lessctl.models import attention_geometry, load_model

        # lm-eval hands on its own --device / --max_batch_size; lessctl takes the device
        # from its config (`device=` model argument) unless the caller passes a loaded model
        lm_device = kwargs.pop("device", None)
        kwargs.pop("max_batch_size", None)
        hf_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in ("add_bos_token", "truncation")}
        if pretrained is None:
            if isinstance(method, Method):
                raise LessctlError("a Method object needs a loaded model (pretrained=)")
            if lm_device and "device" not in kwargs:
                kwargs["device"] = lm_device
            cfg = load_config(lessctl_overrides(kwargs))
            device = resolve_device(cfg.device)
            pretrained, tokenizer = load_model(
                cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed
            )
        elif kwargs:
            raise LessctlError(
                f"lessctl model arguments {sorted(kwargs)} apply only when lessctl loads the "
                f"model; drop them when passing pretrained="
            )
        geo = attention_geometry(pretrained)
        max_length = int(max_length or geo["max_position_embeddings"])
        if not isinstance(method, Method):
            if method not in METHODS:
                raise LessctlError(f"unknown method {method!r}; allowed: {', '.join(METHODS)}")
            if cfg is None:
                cfg = load_config([])
            cfg.eval.methods = [method]
            method = build_methods(cfg, geo, max_length, pretrained.device, pretrained.dtype)[0]
        self.method = method
        super().__init__(
            pretrained=pretrained,
            tokenizer=tokenizer,
            backend="causal",
            max_length=max_length,
            batch_size=batch_size,
            **hf_kw,
        )

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits [B,T,V] of the teacher-forced pass with the method's attention (right padding
        is harmless: every row sees only earlier keys, and a policy's decision for a key depends
        only on earlier rows)."""
        if self.method.name == "full":
            return super()._model_call(inps, attn_mask, labels)
        with use_attention(self.model, ParallelAttention(self.method.policy, self.method.kernels)):
            return super()._model_call(inps, attn_mask, labels)

    def _model_generate(self, context, max_length: int, stop: list[str], **kw) -> torch.Tensor:
        """Context [B,T] (left padded) -> context + new tokens [B,T+N] through the evicting
        cache (prompt protocol); greedy unless the task asks for sampling."""
        attention_mask = kw.pop("attention_mask", None)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = bool(kw.pop("do_sample", None)) and temperature > 0
        new = generate(
            self.model,
            context,
            attention_mask,
            self.method.policy,
            self.method.kernels,
            max_new_tokens=max_length - context.shape[1],
            protocol="prompt",
            do_sample=do_sample,
            temperature=temperature or 1.0,
            stop_strings=[s for s in stop if s] or None,
            tokenizer=self.tokenizer,
        )
        width = max((len(t) for t in new), default=0)
        pad = self.tokenizer.pad_token_id
        tail = torch.tensor([t + [pad] * (width - len(t)) for t in new], dtype=context.dtype)
        return torch.cat([context, tail.to(context.device).view(len(new), width)], 1)

    def get_model_info(self) -> dict:
        """Model facts for lm-eval's results JSON (HFLM's asks the hub for a commit hash)."""
        return {
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(self.model.dtype),
            "lessctl_method": self.method.name,
            "lessctl_policy": self.method.policy.name,
            "lessctl_budget": self.method.policy.budget,
            "lessctl_checkpoint": self.method.checkpoint,
            "max_length": self.max_length,
        }
