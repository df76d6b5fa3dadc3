"""`lessctl extract`: capture post-RoPE q, k, v of every layer in one forward pass, to disk.

The model runs unmodified; a registered attention function (lessctl.hooks) sees q and k after
RoPE and k, v per KV head, copies them out and then calls transformers' SDPA. Each batch of
`extract.batch_size` sequences is one chunk: its shards are written (atomically) as soon as
the forward pass ends, so memory is bounded by one batch. Re-running skips finished chunks
after checking them (every shard present at its recorded size; its sha256 too with
`extract.verify=true`): a chunk that fails is extracted again.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from lessctl.adapters import layer_scaling, output_projection
from lessctl.config import resolve_device, resolve_dtype
from lessctl.data import load_texts, token_windows
from lessctl.errors import LessctlError
from lessctl.hooks import attention_layers, check_supported, sdpa, use_attention
from lessctl.less.attention import parallel_attention
from lessctl.models import attention_geometry, load_model
from lessctl.policies.base import expire, never_evicted
from lessctl.shards import ShardStore, config_hash
from lessctl.units import human_bytes

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def extraction_spec(cfg: DictConfig) -> dict[str, Any]:
    """What determines the extracted activations (its hash names the folder)."""
    m, d, e = cfg.model, cfg.data, cfg.extract
    return {
        "model": OmegaConf.to_container(m, resolve=True),  # geometry of tiny-random included
        "compute_dtype": str(cfg.dtype),
        "data": {k: d.get(k) for k in ("name", "source", "path")},
        "tokens": int(e.tokens),
        "seq_len": int(e.seq_len),
        "batch_size": int(e.batch_size),
        "dtype": str(e.dtype),
        "seed": int(cfg.seed),
    }


def extraction_dir(cfg: DictConfig) -> Path:
    """`<extract.dir>/<hash of extraction_spec>`."""
    return Path(cfg.extract.dir).expanduser() / config_hash(extraction_spec(cfg))


class Capture:
    """Attention function that records q, k, v per layer (of ``layers``; on ``device`` in
    ``dtype``), then runs the layer's own attention (SDPA with the model's mask; the exact fp32
    form where the layer soft-caps)."""

    def __init__(self, dtype: torch.dtype, device="cpu", layers: set[int] | None = None):
        self.dtype, self.device, self.layers = dtype, device, layers  # layers: None = all
        self.seen: dict[int, dict[str, torch.Tensor]] = {}

    def __call__(self, module, query, key, value, attention_mask, **kw):
        if self.layers is None or module.layer_idx in self.layers:
            # contiguous: the model's q, k, v are head-transposed views ([B,S,H,d] in memory);
            # online training's kernels and their backward ran ~3x slower on them
            self.seen[module.layer_idx] = {
                n: t.detach().to(self.device, self.dtype).contiguous()
                for n, t in (("q", query), ("k", key), ("v", value))
            }
        if kw.get("softcap") is not None:
            ev = expire(never_evicted(key), kw.get("sliding_window"))
            out = parallel_attention(
                query,
                key,
                value,
                ev,
                scale=kw.get("scaling"),
                window=kw.get("sliding_window"),
                softcap=kw["softcap"],
            )
            return out.transpose(1, 2).contiguous(), None
        return sdpa(module, query, key, value, attention_mask, **kw)


def training_text(cfg: DictConfig, tok, geo: dict[str, int]):
    """(corpus, windows [N, seq_len] token ids, chunks of ``extract.batch_size`` windows): the
    text kernels are trained on, whether extracted to disk or trained on online."""
    e = cfg.extract
    tokens, seq_len = int(e.tokens), int(e.seq_len)
    if tokens < seq_len or tokens % seq_len:  # checked here, not when any config composes:
        # a model's own seq_len (e.g. 131072) is no reason to refuse an eval's config
        raise LessctlError(
            f"extract.tokens={tokens} is invalid; allowed: a multiple of extract.seq_len="
            f"{seq_len} (whole sequences), e.g. {max(1, round(tokens / seq_len)) * seq_len}"
        )
    corpus = load_texts(cfg.data)
    windows = token_windows(corpus.items, tok, seq_len, tokens)
    if windows.shape[1] > geo["max_position_embeddings"] > 0:
        raise LessctlError(
            f"extract.seq_len={e.seq_len} exceeds the model's max_position_embeddings="
            f"{geo['max_position_embeddings']}"
        )
    bs = int(e.batch_size)
    return corpus, windows, [windows[i : i + bs] for i in range(0, len(windows), bs)]


def bytes_needed(n_seq: int, seq_len: int, geo: dict[str, int], dtype: torch.dtype) -> int:
    per_token = geo["num_layers"] * (geo["num_heads"] + 2 * geo["num_kv_heads"]) * geo["head_dim"]
    return n_seq * seq_len * per_token * torch.finfo(dtype).bits // 8


def checked_chunks(store: ShardStore, done: set[int], layers: int, hashes: bool, log) -> set[int]:
    """The finished chunks of ``done`` that pass :meth:`ShardStore.check_chunk`; a failing one's
    marker is removed (so it counts as not done, and is extracted again) with one line saying
    why."""
    good = set()
    for c in sorted(done):
        problem = store.check_chunk(c, layers, hashes)
        if problem is None:
            good.add(c)
            continue
        log(f"chunk {c}: {problem}; extracting it again")
        store.marker(c).unlink()
    return good


def run(cfg: DictConfig, log=print) -> dict[str, Any]:
    """Extract activations for `cfg`; returns the manifest (resumes finished chunks)."""
    e = cfg.extract
    if e.dtype not in STORE_DTYPES:
        raise LessctlError(f"extract.dtype={e.dtype!r}; allowed: {', '.join(STORE_DTYPES)}")
    store_dtype = STORE_DTYPES[e.dtype]
    device = resolve_device(cfg.device)
    model, tok = load_model(cfg.model, device, resolve_dtype(cfg.dtype, device), seed=cfg.seed)
    geo = attention_geometry(model)
    views = check_supported(model)
    if not attention_layers(model):
        raise LessctlError(f"model {cfg.model.name} has no attention layers to capture")
    corpus, windows, chunks = training_text(cfg, tok, geo)
    store = ShardStore(extraction_dir(cfg))
    done = set(store.done_chunks()) if store.manifest_path.exists() else set()
    if done:  # resuming: the finished chunks must come from the same text and model
        old = store.manifest()
        now = {"source": corpus.source, "sequences": int(len(windows)), "geometry": geo}
        for key, value in now.items():
            if old.get(key) != value:
                raise LessctlError(
                    f"cannot resume {store.root}: its {key} was {old.get(key)!r}, now {value!r}; "
                    f"delete the folder or set extract.dir elsewhere"
                )
        done = checked_chunks(store, done, geo["num_layers"], bool(e.get("verify", False)), log)
    todo = [c for c in range(len(chunks)) if c not in done]
    need = bytes_needed(sum(len(chunks[c]) for c in todo), windows.shape[1], geo, store_dtype)
    store.root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store.root).free
    log(
        f"extract → {store.root}: {len(windows)} sequences × {windows.shape[1]} tokens, "
        f"{len(done)} chunks done, {len(todo)} to do, needs {need / 2**30:.2f} GiB "
        f"(free {free / 2**30:.1f} GiB)"
    )
    if need > free:
        raise LessctlError(
            f"extraction needs {human_bytes(need)} but {store.root} has {human_bytes(free)} "
            f"free; lower extract.tokens or set extract.dir"
        )
    manifest = {
        "hash": store.root.name,
        "spec": extraction_spec(cfg),
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "source": corpus.source,
        "seq_len": int(windows.shape[1]),
        "sequences": int(len(windows)),
        "tokens": int(windows.numel()),
        "chunks": len(chunks),
        "dtype": e.dtype,
        "geometry": geo,
        "scaling": layer_scaling(attention_layers(model)[0]),
        "layers": views,  # per layer: the scaling, sliding window and softcap it attends with
    }
    o_proj = {}
    for m in attention_layers(model):
        for name, p in output_projection(m).named_parameters():
            o_proj[f"layer_{m.layer_idx}.{name}"] = p.detach().to("cpu", torch.float32)
    manifest["o_proj_sha256"] = store.write_o_proj(o_proj)
    store.write_manifest(manifest)

    capture = Capture(store_dtype)
    cols = [
        TextColumn("extract"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} seq"),
        TextColumn("{task.fields[rate]:.0f} tok/s"),
        TimeElapsedColumn(),
    ]
    t0, n_tok = time.perf_counter(), 0
    with Progress(*cols, transient=False) as bar, use_attention(model, capture), torch.no_grad():
        task = bar.add_task(
            "extract",
            total=len(windows),
            completed=len(windows) - sum(len(chunks[c]) for c in todo),
            rate=0.0,
        )
        for c in todo:
            capture.seen.clear()
            model(chunks[c].to(device), use_cache=False)
            store.write_chunk(c, dict(capture.seen))
            n_tok += chunks[c].numel()
            bar.update(task, advance=len(chunks[c]), rate=n_tok / (time.perf_counter() - t0))
    if len(store.done_chunks()) != len(chunks):
        raise LessctlError(f"extraction at {store.root} is incomplete; run it again to resume")
    return manifest
