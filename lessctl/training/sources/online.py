"""Online training (`train.source=online`): the frozen model runs over the training text and
every selected layer's φ/ψ trains from the q, k, v of that forward pass; nothing is written but
checkpoints (and rows).

The text, its windows and chunks are extract's (:func:`lessctl.extract.training_text`), the
split, batch order and loop are shards' (:mod:`lessctl.training.loop`), so online and shards
training with the same seed see the same sequences in the same order and give the same kernels.
Each chunk of ``extract.batch_size`` sequences is one forward pass; q, k, v of every selected
layer are captured (fp32, on the device), each layer's fixed part (target, decisions, sparse
part) computed and its optimiser stepped, one layer at a time.

Resumable: every ``train.save_every`` steps (and after each epoch) all layers' kernels,
optimiser and schedule states, the data position and the RNG states are written atomically to
``<checkpoint>/online_state-<hash of the layers>.pt``; a re-run with the same overrides
continues from there.

Data parallel under ``torchrun``: each global batch of ``batch_size × world`` rows is split
across the ranks and every layer's gradients are averaged (all_reduce, weighted by rows); rank
0 writes checkpoints. Every rank validates on all validation sequences.
"""

from __future__ import annotations

import io
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from lessctl.adapters import layer_scaling, output_projection
from lessctl.atomic import write_bytes_atomic
from lessctl.config import resolve_device, resolve_dtype
from lessctl.errors import LessctlError
from lessctl.extract import Capture, extraction_spec, training_text
from lessctl.hooks import attention_layers, check_supported, use_attention
from lessctl.less.attention import max_evicted_per_chunk
from lessctl.models import attention_geometry, load_model
from lessctl.shards import config_hash
from lessctl.training.checkpoints import (
    LayerLock,
    checkpoint_dir,
    finished_metrics,
    save_layer,
    write_manifest,
)
from lessctl.training.loop import LayerTrainer, batch_plan, split_sequences, take
from lessctl.training.objective import decisions, fixed_part
from lessctl.training.sources.shards import layer_view
from lessctl.training.spec import kernel_config, select_layers

STATE = "online_state-{}.pt"  # runs on disjoint layers of one folder keep their own


def resume_state_path(out: Path, layers: list[int], others: tuple | list = ()) -> Path:
    """Where an online run training ``layers`` of checkpoint folder ``out`` keeps its resume
    state: one file per layer set (and, for a pass feeding several targets, per set of their
    folder names ``others``)."""
    key = sorted(layers) if not others else [sorted(layers), sorted(others)]
    return out / STATE.format(config_hash(key, 12))


# -- processes
def distributed(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world size, this rank's device); starts the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _average(world: int):
    """Sum every rank's (already row-weighted) gradients and divide by the world size."""

    def reduce(grads: list[torch.Tensor]) -> None:
        for g in grads:
            dist.all_reduce(g)
            g.div_(world)

    return reduce if world > 1 else None


def _broadcast(obj: Any, world: int) -> Any:
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- memory
def memory_estimate(
    geo: dict[str, int],
    model_bytes: int,
    hidden_size: int,
    intermediate: int,
    batch: int,
    seq_len: int,
    n_layers: int,
    kernel_params: int,
    compute_bytes: int,
    n_trainers: int | None = None,
) -> dict[str, int]:
    """Peak-memory parts (bytes) of online training: the frozen model; one forward's
    activations (a decoder layer's hidden states and MLP at a time, in the compute dtype); the
    captured fp32 q, k, v of ``n_layers`` layers; one layer's training step (fixed part,
    kernels' activations and backward, fp32); all layers' kernels with Adam's two moments,
    gradients and the best epoch's copy (5 × parameters, fp32) for ``n_trainers`` (layer,
    target) pairs (default: one target, ``n_layers``). Not bounded by the token count: only by
    one chunk of ``batch`` × ``seq_len`` tokens. Each extra target of one pass adds its
    kernels' share alone: its layers' steps run one at a time, after the shared forward."""
    tok = batch * seq_len
    h, hkv, d = geo["num_heads"], geo["num_kv_heads"], geo["head_dim"]
    forward = tok * (4 * hidden_size + 3 * intermediate + 2 * (h + 2 * hkv) * d) * compute_bytes
    captured = tok * n_layers * (h + 2 * hkv) * d * 4
    # fixed part (target, sparse out/lse, evict_at) + phi/psi MLP activations kept for backward
    step = tok * (2 * hidden_size + 2 * h * d + 2 * h + 2 * hkv) * 4
    step += tok * (h + hkv) * kernel_params_hidden(kernel_params, geo) * 4 * 4
    kernels = 5 * kernel_params * (n_layers if n_trainers is None else n_trainers) * 4
    return {
        "model": model_bytes,
        "forward": forward,
        "captured": captured,
        "step": step,
        "kernels": kernels,
        "total": model_bytes + forward + captured + step + kernels,
    }


def kernel_params_hidden(kernel_params: int, geo: dict[str, int]) -> int:
    """The φ/ψ MLP width implied by a layer's parameter count (≈ (H + Hkv) d hidden)."""
    return max(1, kernel_params // ((geo["num_heads"] + geo["num_kv_heads"]) * geo["head_dim"]))


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


# -- resume state
def _save_state(path: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getvalue())


def _trainer_state(tr: LayerTrainer) -> dict[str, Any]:
    return {
        "kern": tr.kern.state_dict(),
        "opt": tr.opt.state_dict(),
        "sched": tr.sched.state_dict(),
        "rng": tr.rng,
        "loss_sum": tr.loss_sum.cpu(),
        "loss_steps": tr.loss_steps,
        "tok": tr.tok,
        "history": tr.history,
        "status": tr.status,
        "first": tr.first,
        "best": tr.best,
        "best_state": tr.best_state,
    }


def _restore(tr: LayerTrainer, s: dict[str, Any]) -> None:
    tr.kern.load_state_dict(s["kern"])
    tr.opt.load_state_dict(s["opt"])
    tr.sched.load_state_dict(s["sched"])
    tr.rng = s["rng"]
    tr.loss_sum, tr.loss_steps = s["loss_sum"].to(tr.device), s["loss_steps"]
    tr.tok, tr.history, tr.status = s["tok"], s["history"], s["status"]
    tr.first, tr.best = s["first"], s["best"]
    tr.best_state = {k: v.to(tr.device) for k, v in s["best_state"].items()}


@dataclass
class Target:
    """One training fed by the pass: its config, policies, checkpoint folder, the layers this
    run trains for it (and their trainers) and the layers found finished."""

    cfg: DictConfig
    policy: Any
    plus: Any
    out: Path
    todo: list[int] = field(default_factory=list)
    done: dict[int, dict[str, Any]] = field(default_factory=dict)
    trainers: dict[int, LayerTrainer] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.policy.name}@{self.policy.budget}"


def run(cfg: DictConfig, log=print) -> tuple[Path, list[dict[str, Any]]]:
    """Train every selected layer online for ``cfg``'s policy (skipping finished and locked
    layers): (checkpoint folder, metrics)."""
    return run_targets([cfg], log)[0]


def run_targets(cfgs: list[DictConfig], log=print) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Train every selected layer online for each config of ``cfgs`` (the targets of
    :mod:`lessctl.training.targets`: same text, model, layers and hyperparameters, their own
    policy and budget), all fed by one forward pass per batch; per target (checkpoint folder,
    metrics of the layers trained or found finished)."""
    from lessctl.training.runner import checkpoint_manifest, policies

    cfg = cfgs[0]
    for other in cfgs[1:]:
        _check_shared(cfg, other)
    rank, world, device = distributed(resolve_device(cfg.device))
    say = log if rank == 0 else (lambda *_: None)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tok = load_model(cfg.model, device, dtype, seed=cfg.seed)
    model.eval()
    geo = attention_geometry(model)
    views = check_supported(model)
    corpus, windows, chunks = training_text(cfg, tok, geo)
    man = {
        "hash": config_hash(extraction_spec(cfg)),  # the text's identity, as extract names it
        "train_source": "online",
        "model": cfg.model.name,
        "dataset": cfg.data.name,
        "source": corpus.source,
        "seq_len": int(windows.shape[1]),
        "sequences": int(len(windows)),
        "tokens": int(windows.numel()),
        "geometry": geo,
        "scaling": layer_scaling(attention_layers(model)[0]),
        "layers": views,
        "world": world,
    }
    targets = []
    for c in cfgs:
        policy, plus = policies(c, man["seq_len"], geo, device)
        targets.append(Target(c, policy, plus, checkpoint_dir(c, man)))
    if len({t.out for t in targets}) < len(targets):
        raise LessctlError("two targets of train.policies × train.budgets name one checkpoint")
    locks = []
    if rank == 0:
        for t in targets:
            write_manifest(t.out, checkpoint_manifest(t.cfg, man, t.policy, None))
            for layer in select_layers(t.cfg, geo["num_layers"]):
                done = finished_metrics(t.out, layer)
                if done is not None:
                    say(f"{t.name} layer {layer}: already trained, skipping")
                    t.done[layer] = done
                    continue
                lock = LayerLock(t.out, layer)
                if not lock.acquire():
                    say(f"{t.name} layer {layer}: being trained by another run, skipping")
                    continue
                locks.append(lock)
                t.todo.append(layer)
    todos = _broadcast([t.todo for t in targets], world)
    for t, todo in zip(targets, todos, strict=True):
        t.todo = todo
    try:
        _train(cfg, model, chunks, man, targets, rank, world, device, say)
    finally:
        for lock in locks:
            lock.release()
    return [(t.out, [t.done[i] for i in sorted(t.done)]) for t in targets]


def _check_shared(a: DictConfig, b: DictConfig) -> None:
    """Targets of one pass share the text, model, layers, seed and hyperparameters."""
    for key in ("model", "data", "extract", "seed", "dtype", "device", "less", "train"):
        x, y = a.get(key), b.get(key)
        if key == "train":
            lists = ("policies", "budgets")
            x, y = ({k: v for k, v in t.items() if k not in lists} for t in (x, y))
        if x != y:
            raise LessctlError(f"targets of one pass must share {key}; they differ")


def _train(cfg, model, chunks, man, targets, rank, world, device, say):
    from lessctl.training.runner import layer_metrics

    t = cfg.train
    layers = sorted({i for tg in targets for i in tg.todo})
    if not layers:
        return
    geo = man["geometry"]
    reduce = _average(world)
    for tg in targets:
        seed, budget = int(cfg.seed), tg.policy.budget
        tg.trainers = {
            i: LayerTrainer(kernel_config(tg.cfg, geo, i), i, seed, t, budget, device, reduce)
            for i in tg.todo
        }
    mods = attention_layers(model)
    w = {
        i: {
            n: p.detach().to(device, torch.float32)
            for n, p in output_projection(mods[i]).named_parameters()
        }
        for i in layers
    }
    view = {i: layer_view(man, i) for i in layers}
    bs, epochs = int(t.batch_size), int(t.epochs)
    train_seqs, val_seqs = split_sequences(
        list(range(len(chunks))), [len(c) for c in chunks], t.val_fraction, t.max_train_sequences
    )
    # memory bound, printed as extract prints its disk need
    tcfg = model.config.get_text_config(decoder=True)
    n_trainers = sum(len(tg.todo) for tg in targets)
    params = [
        sum(p.numel() for p in tr.kern.parameters())
        for tg in targets
        for tr in tg.trainers.values()
    ]
    est = memory_estimate(
        geo,
        sum(p.numel() * p.element_size() for p in model.parameters()),
        int(tcfg.hidden_size),
        int(getattr(tcfg, "intermediate_size", 4 * tcfg.hidden_size)),
        max(len(c) for c in chunks),
        man["seq_len"],
        len(layers),
        max(params),  # the largest layer's (a rank per layer: they differ), a bound
        torch.empty((), dtype=next(model.parameters()).dtype).element_size(),
        n_trainers,
    )
    names = ", ".join(f"{tg.name} ({len(tg.todo)} layers)" for tg in targets)
    say(
        f"train (online) → {', '.join(str(tg.out) for tg in targets)}: {len(train_seqs)} "
        f"training + {len(val_seqs)} validation sequences × {man['seq_len']} tokens, layers "
        f"{layers[0]}..{layers[-1]} ({len(layers)}), {len(targets)} target(s) fed by one pass: "
        f"{names}; {world} process(es); peak memory ≈ {_gib(est['total'])} per process (model "
        f"{_gib(est['model'])}, one batch's forward {_gib(est['forward'])}, captured q/k/v "
        f"{_gib(est['captured'])}, one layer's step {_gib(est['step'])}, kernels + Adam "
        f"{_gib(est['kernels'])}); disk: checkpoints only"
    )
    capture = Capture(torch.float32, device, set(layers))

    def forward(c: int, rows: list[int]) -> dict[int, dict[str, torch.Tensor]]:
        capture.seen.clear()
        with use_attention(model, capture), torch.no_grad():
            model(chunks[c][rows].to(device), use_cache=False)
        return dict(capture.seen)

    def per_layer(seen, validation: bool, pick):
        """For each layer, each (target, trainer) that ``pick`` keeps, with the batch's fixed
        part for that target; the layer's own output (the target of the loss) is computed once
        and shared by the targets."""
        for i in layers:
            pairs = [(tg, tg.trainers[i]) for tg in targets if i in tg.trainers]
            pairs = [(tg, tr) for tg, tr in pairs if pick(tr)]
            if not pairs:
                continue
            raw = seen[i] if seen is not None else None
            shared = None
            for tg, tr in pairs:
                if raw is None:
                    yield i, tr, None
                    continue
                q, k, v = raw["q"], raw["k"], raw["v"]
                ev = decisions(tg.policy, q, k, view[i])
                ev_plus = decisions(tg.plus, q, k, view[i]) if validation else None
                d = {**raw, **fixed_part(q, k, v, w[i], view[i], ev, ev_plus, target=shared)}
                shared = d["target"]
                yield i, tr, d

    def validate(active) -> None:
        """Validation MSE of each active trainer (``active``: a set of trainers)."""
        for tr in active:
            tr.val_begin()
        for c, sels in batch_plan(val_seqs, bs, None):
            rows = sorted({r for s in sels for r in s})
            pos = {r: j for j, r in enumerate(rows)}
            seen = forward(c, rows)
            for i, tr, d in per_layer(seen, True, lambda tr: tr in active):
                bound = int(max_evicted_per_chunk(d["evict_at"]))
                for sel in sels:
                    tr.val_add(take(d, [pos[r] for r in sel]), w[i], view[i].window, bound)
        return {tr: tr.val_end() for tr in active}

    every_trainer = [tr for tg in targets for tr in tg.trainers.values()]
    state_path = resume_state_path(
        targets[0].out, layers, [tg.out.name for tg in targets] if len(targets) > 1 else ()
    )
    rng = random.Random(int(cfg.seed))
    start_epoch, start_pos, steps = 1, 0, 0
    every = int(t.get("save_every") or 0)
    todo_key = [[tg.out.name, tg.todo] for tg in targets]
    state = None
    if state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state.get("todo", [[targets[0].out.name, state["layers"]]]) != todo_key or (
            state["world"] != world
        ):
            say(f"{state_path.name}: saved for other layers or processes; starting afresh")
            state = None
    if state is not None:
        for j, tg in enumerate(targets):
            saved = state["trainers"] if "todo" not in state else state["trainers"][j]
            for i, tr in tg.trainers.items():
                _restore(tr, saved[i])
        rng.setstate(state["rng"])
        start_epoch, start_pos, steps = state["epoch"], state["pos"], state["steps"]
        say(f"resuming at epoch {start_epoch}, chunk {start_pos} of its order ({steps} steps done)")
    else:
        first = validate(set(every_trainer))
        for tr in every_trainer:
            tr.record(0, first[tr])

    def save(epoch: int, pos: int, rng_state) -> None:
        if rank == 0:
            _save_state(
                state_path,
                {
                    "layers": layers,
                    "todo": todo_key,
                    "world": world,
                    "epoch": epoch,
                    "pos": pos,
                    "steps": steps,
                    "rng": rng_state,
                    "trainers": [
                        {i: _trainer_state(tr) for i, tr in tg.trainers.items()} for tg in targets
                    ],
                },
            )
        if world > 1:
            dist.barrier()

    t0, last_save, last_say = time.perf_counter(), steps, time.perf_counter()
    for epoch in range(start_epoch, epochs + 1):
        epoch_rng = rng.getstate()  # the order of this epoch is drawn from here
        plan = list(batch_plan(train_seqs, bs * world, rng))
        for p in range(start_pos, len(plan)):
            c, sels = plan[p]
            local = [s[rank::world] for s in sels]  # rank r's rows of each global batch
            rows = sorted({r for s in local for r in s})
            seen = None
            if rows:
                pos = {r: j for j, r in enumerate(rows)}
                seen = forward(c, rows)
            for i, tr, d in per_layer(seen, False, lambda tr: not tr.stopped):
                bound = int(max_evicted_per_chunk(d["evict_at"])) if d is not None else 0
                for s, ls in zip(sels, local, strict=True):
                    if ls:
                        b = take(d, [pos[r] for r in ls])
                        tr.step(b, w[i], view[i].window, bound, weight=len(ls) * world / len(s))
                    else:  # this rank has no row of the batch: it still joins the all_reduce
                        tr.empty_step()
            steps += len(sels)
            if every and steps - last_save >= every:
                save(epoch, p + 1, epoch_rng)
                last_save = steps
            if time.perf_counter() - last_say > 300:  # a line every 5 minutes on long runs
                last_say = time.perf_counter()
                say(f"epoch {epoch}: chunk {p + 1}/{len(plan)} ({steps} steps)")
        start_pos = 0
        active = set()
        for tg in targets:
            for i, tr in tg.trainers.items():
                if tr.stopped:
                    continue
                if tr.end_epoch(epoch):
                    active.add(tr)
                else:
                    say(f"{tg.name} layer {i}: {tr.status}; not finished (a re-run retrains it)")
        if active:
            vals = validate(active)
            rate = sum(tr.tok for tr in active) / len(active)
            for tr in every_trainer:
                if tr in active:
                    tr.record(epoch, vals[tr])
                    say(tr.log_line(rate / (time.perf_counter() - t0), "online"))
        if every:
            save(epoch + 1, 0, rng.getstate())
            last_save = steps
    elapsed = max(time.perf_counter() - t0, 1e-9)
    for tg in targets:
        for i, tr in tg.trainers.items():
            m = layer_metrics(
                tr,
                tg.policy,
                tg.plus,
                train_sequences=len(train_seqs),
                val_sequences=len(val_seqs),
                data_in="online",
                tokens_per_s=tr.tok * world / elapsed,
                train_tokens=len(train_seqs) * man["seq_len"],
                pass_targets=len(targets),
            )
            tg.done[i] = save_layer(tg.out, tr.kern, m) if rank == 0 else m
    if rank == 0:
        state_path.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
