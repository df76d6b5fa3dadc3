"""Training from activation shards (`train.source=shards`): one extraction on disk, re-used by
many training runs. Each layer is trained in turn; :class:`LayerData` reads that layer's q, k, v
and precomputes what does not depend on φ/ψ (:func:`lessctl.training.objective.fixed_part`).
A state-aware policy's decisions do depend on them (``recall``): they are remade after every
epoch with the kernels of that moment (:meth:`LayerData.redecide`, called by the runner)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file

from lessctl.extract import extraction_dir
from lessctl.less.attention import max_evicted_per_chunk
from lessctl.shards import ShardError, ShardStore, save_atomic
from lessctl.training.objective import LayerView, decisions, fixed_part


def activations(cfg: DictConfig) -> ShardStore:
    """The extraction that `cfg` names (train.activations, or the extraction hash of cfg)."""
    root = Path(cfg.train.activations).expanduser() if cfg.train.activations else None
    store = ShardStore(root or extraction_dir(cfg))
    if not store.manifest_path.exists():
        raise ShardError(
            f"no activations at {store.root} for model={cfg.model.name} data={cfg.data.name} "
            f"extract.tokens={cfg.extract.tokens} extract.seq_len={cfg.extract.seq_len}: "
            f"run `lessctl extract` with the same overrides first (or train.source=online)"
        )
    man = store.manifest()
    if man["model"] != cfg.model.name:
        raise ShardError(
            f"activations at {store.root} come from model {man['model']!r}, not "
            f"model={cfg.model.name}; extract for this model or point train.activations elsewhere"
        )
    if root is None and man["hash"] != store.root.name:
        raise ShardError(f"manifest hash {man['hash']} does not match folder {store.root}")
    if "layers" not in man:
        raise ShardError(
            f"extraction at {store.root} predates per-layer attention views (scaling, sliding "
            f"window, soft-capping), so its targets would ignore them: delete it and run "
            f"`lessctl extract` again"
        )
    done = len(store.done_chunks())
    if done != man["chunks"]:
        raise ShardError(
            f"extraction at {store.root} is incomplete ({done}/{man['chunks']} chunks); "
            f"run `lessctl extract` again with the same overrides to finish it"
        )
    return store


def chunk_sizes(store: ShardStore) -> list[int]:
    """Sequences per finished chunk, in chunk order."""
    return [json.loads(store.marker(c).read_text())["sequences"] for c in store.done_chunks()]


def layer_view(man: dict, layer: int) -> LayerView:
    """A layer's scaling, window and softcap as the extraction recorded them."""
    view = man["layers"][layer]
    scale = man["scaling"] if view.get("scaling") is None else view["scaling"]
    return LayerView(scale, view.get("window"), view.get("softcap"))


class LayerData:
    """One layer's training tensors: q, k, v from the shards and what does not depend on φ/ψ
    (target, evict_at, sparse out/lse; for validation chunks also the Baseline and Baseline+
    outputs after o_proj), computed once per layer by :meth:`prepare`.

    Held on the training device when they fit in `memory_bytes` (read once per layer, not per
    epoch); otherwise written per chunk next to the checkpoint folder and streamed back every
    epoch. Precomputed tensors are stored in the activations' dtype (the precision of q, k, v)
    except ``sparse_lse`` (fp32) and ``evict_at`` (long); the loss is computed in fp32.
    """

    FLOAT_KEYS = ("target", "sparse_out", "baseline", "plus")
    GROUP_BYTES = 512 * 2**20  # fp32 q and k of the chunks whose decisions are made at once

    def __init__(
        self,
        store: ShardStore,
        layer: int,
        policy,
        plus,
        scale: float,
        device,
        cache_dir: Path,
        memory_bytes: float = float("inf"),
    ):
        self.store, self.layer, self.device = store, layer, device
        self.policy, self.plus, self.cache = policy, plus, cache_dir
        self.memory_bytes = memory_bytes
        self.w = {k: v.to(device) for k, v in store.o_proj(layer).items()}
        man = store.manifest()  # `activations` refuses extractions without per-layer views
        self.view = layer_view({**man, "scaling": scale}, layer)
        self.window, self.softcap, self.scale = self.view.window, self.view.softcap, self.view.scale
        if not self.w:
            raise ShardError(f"o_proj weights of layer {layer} missing in {store.root}")
        self.kernels = None  # a state-aware policy's kernels for its decisions (:meth:`redecide`)
        self.resident: dict[int, dict[str, torch.Tensor]] | None = None
        self.max_evicted: int | None = None  # the most keys a 128-row chunk evicts (static shapes)

    def _pre_path(self, chunk: int) -> Path:
        return self.cache / f"chunk_{chunk:05d}.safetensors"

    def _raw(self, chunk: int) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in self.store.read(self.layer, chunk).items()}

    def _evict_at(self, policy, raws: list[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The policy's decisions for several chunks in one call: a sequential policy's
        per-token loop (H2O, TOVA) costs about the same for 4 sequences as for 200, so one call
        over many chunks instead of one per chunk (exactly the same decisions, per sequence)."""
        q = torch.cat([r["q"] for r in raws]).to(torch.float32)
        k = torch.cat([r["k"] for r in raws]).to(torch.float32)
        kern = self.kernels if policy is self.policy else None
        v = torch.cat([r["v"] for r in raws]).to(torch.float32) if kern is not None else None
        ev = decisions(policy, q, k, self.view, v, kern)
        return list(ev.split([r["q"].shape[0] for r in raws]))

    def _precompute(
        self,
        raw: dict[str, torch.Tensor],
        validation: bool,
        ev: torch.Tensor | None = None,
        ev_plus: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Target, evict_at, sparse part (and for validation Baseline, Baseline+) of one chunk;
        ``ev`` / ``ev_plus``: the policy's / Baseline+'s decisions when already known."""
        dt = raw["q"].dtype
        q, k, v = (raw[n].to(torch.float32) for n in ("q", "k", "v"))
        if ev is None:
            ev = decisions(self.policy, q, k, self.view, v, self.kernels)
        if validation and ev_plus is None:
            ev_plus = decisions(self.plus, q, k, self.view)
        pre = fixed_part(q, k, v, self.w, self.view, ev, ev_plus if validation else None)
        return {n: t.to(dt) if n in self.FLOAT_KEYS else t for n, t in pre.items()}

    def load(self, chunk: int, validation: bool = False) -> dict[str, torch.Tensor]:
        """q, k, v (activations' dtype) + the precomputed tensors of one chunk."""
        if self.resident is not None and chunk in self.resident:
            return self.resident[chunk]
        raw = self._raw(chunk)
        p = self._pre_path(chunk)
        if p.exists():
            pre = {k: v.to(self.device) for k, v in load_file(p).items()}
        else:
            pre = self._precompute(raw, validation)
            self._save_pre(chunk, pre)
        return {**raw, **pre}

    def _save_pre(self, chunk: int, d: dict[str, torch.Tensor]) -> None:
        pre = {k: t.cpu() for k, t in d.items() if k not in ("q", "k", "v")}
        save_atomic(pre, self._pre_path(chunk))

    def prepare(self, train_chunks: list[int], val_chunks: list[int]) -> str:
        """Precompute every chunk once; keep them all in memory if they fit, else on disk.
        Returns "memory" or "stream"."""
        roles = [(c, False) for c in train_chunks] + [(c, True) for c in val_chunks]
        held: dict[int, dict[str, torch.Tensor]] = {}
        used, bound, mode = 0, torch.zeros((), dtype=torch.long, device=self.device), "memory"
        for c, validation, raw, ev, ev_plus in self._decided(roles):
            d = {**raw, **self._precompute(raw, validation, ev, ev_plus)}
            bound = torch.maximum(bound, max_evicted_per_chunk(d["evict_at"]))
            used += sum(t.numel() * t.element_size() for t in d.values())
            if mode == "memory" and used <= self.memory_bytes:
                held[c] = d
                continue
            if mode == "memory":  # does not fit: write what is held so far, stream from now on
                mode = "stream"
                for hc, hd in held.items():
                    self._save_pre(hc, hd)
                held = {}
            self._save_pre(c, d)
        self.resident = held if mode == "memory" else None
        self.max_evicted = int(bound)  # one host sync per layer
        return mode

    def redecide(self, kernels, train_chunks: list[int], val_chunks: list[int]) -> str:
        """A state-aware policy (``recall``): remake the decisions with ``kernels`` (a frozen
        copy, eval mode) and everything computed from them. The precomputed parts held in
        memory or on disk were made with the previous decisions: they are dropped (the
        folder emptied) before :meth:`prepare` runs again. Returns its mode."""
        import copy
        import shutil

        self.kernels = copy.deepcopy(kernels).eval()
        self.resident = None
        shutil.rmtree(self.cache, ignore_errors=True)
        return self.prepare(train_chunks, val_chunks)

    def _decided(self, roles: list[tuple[int, bool]]):
        """(chunk, validation, raw, evict_at, Baseline+'s evict_at or None) per role, the
        decisions made for groups of chunks of up to ``GROUP_BYTES`` of fp32 q and k at once."""
        group: list[tuple[int, bool, dict[str, torch.Tensor]]] = []
        size = 0

        def flush(group: list[tuple[int, bool, dict[str, torch.Tensor]]]):
            raws = [r for _, _, r in group]
            evs = self._evict_at(self.policy, raws)
            val = [i for i, (_, v, _) in enumerate(group) if v]
            plus_evs = self._evict_at(self.plus, [raws[i] for i in val]) if val else []
            plus = dict(zip(val, plus_evs, strict=True))
            for i, (c, v, r) in enumerate(group):
                yield c, v, r, evs[i], plus.get(i)

        for c, validation in roles:
            raw = self._raw(c)
            n = raw["q"].numel() + raw["k"].numel()
            if group and (size + n) * 4 > self.GROUP_BYTES:
                yield from flush(group)
                group, size = [], 0
            group.append((c, validation, raw))
            size += n
        if group:
            yield from flush(group)
