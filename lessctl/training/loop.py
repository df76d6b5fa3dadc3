"""The training loop of one layer's kernels, whatever feeds it (shards or the online forward).

:class:`LayerTrainer` holds a layer's φ/ψ, its Adam optimiser and StepLR schedule, its own
RNG stream (dropout), the validation MSE of LESS / Baseline / Baseline+ per epoch and the best
epoch's state. A source calls :meth:`~LayerTrainer.step` per batch, :meth:`~LayerTrainer.end_epoch`
after each epoch and the ``val_*`` methods over the validation sequences.

The data split (:func:`split_sequences`) and batch order (:func:`batch_plan`) are pure, shared
by every source: the last ``val_fraction`` of chunks validate (whole chunks), and each epoch
visits the training chunks in a shuffled order, a chunk's rows shuffled, ``batch_size`` rows a
step. ``seed`` decides the order; a layer's kernels start from ``seed * 1000 + layer``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lessctl.errors import LessctlError
from lessctl.less.kernels import KernelConfig, LayerKernels
from lessctl.training.objective import layer_loss, predict, rows_mse

Pairs = list[tuple[int, int]]  # (chunk, row in chunk)


def split_sequences(
    chunks: list[int], sizes: list[int], val_fraction: float, max_train: int | None
) -> tuple[Pairs, Pairs]:
    """(train, validation) (chunk, row) pairs of chunks ``chunks`` holding ``sizes`` sequences:
    the last ``val_fraction`` of chunks (at least one, never all) validate."""
    if len(chunks) < 2:
        raise LessctlError(f"{len(chunks)} chunk(s) of sequences; training needs >= 2")
    n_val = min(max(1, math.ceil(len(chunks) * float(val_fraction))), len(chunks) - 1)
    pairs = [[(c, i) for i in range(n)] for c, n in zip(chunks, sizes, strict=True)]
    train = [p for ps in pairs[:-n_val] for p in ps]
    val = [p for ps in pairs[-n_val:] for p in ps]
    if max_train:
        train = train[: int(max_train)]
    return train, val


def batch_plan(
    items: Pairs, batch_size: int, rng: random.Random | None
) -> Iterator[tuple[int, list[list[int]]]]:
    """Per chunk (in order, or shuffled by ``rng``): its rows cut into batches of
    ``batch_size`` (rows shuffled too when ``rng`` is given)."""
    by_chunk: dict[int, list[int]] = {}
    for c, i in items:
        by_chunk.setdefault(c, []).append(i)
    order = list(by_chunk)
    if rng is not None:
        rng.shuffle(order)
    for c in order:
        rows = by_chunk[c]
        if rng is not None:
            rng.shuffle(rows)
        yield c, [rows[a : a + batch_size] for a in range(0, len(rows), batch_size)]


def take(d: dict[str, torch.Tensor], sel: list[int]) -> dict[str, torch.Tensor]:
    """Rows ``sel`` of every tensor of a chunk (a view where they are contiguous)."""
    if sel == list(range(sel[0], sel[0] + len(sel))):
        return {k: v[sel[0] : sel[0] + len(sel)] for k, v in d.items()}
    n_chunk = next(iter(d.values())).shape[0]
    if sorted(sel) == list(range(n_chunk)):  # the whole chunk in another order
        return d
    idx = torch.tensor(sel, device=next(iter(d.values())).device)
    return {k: v.index_select(0, idx) for k, v in d.items()}


class LayerTrainer:
    """One layer's kernels, optimiser, schedule, RNG, validation record and best state."""

    def __init__(
        self,
        kcfg: KernelConfig,
        layer: int,
        seed: int,
        train_cfg,
        budget: int,
        device: torch.device,
        reduce: Callable[[list[torch.Tensor]], None] | None = None,
    ):
        self.layer, self.budget, self.device = layer, budget, torch.device(device)
        self.seed = seed * 1000 + layer
        torch.manual_seed(self.seed)
        self.kern = LayerKernels(kcfg).to(self.device)
        self.rng = self._rng_state()
        t = train_cfg
        self.opt = torch.optim.Adam(self.kern.parameters(), lr=float(t.lr))
        self.sched = torch.optim.lr_scheduler.StepLR(
            self.opt, step_size=int(t.step_size), gamma=float(t.gamma)
        )
        self.reduce = reduce  # data parallel: averages the gradients across processes
        # this epoch's training loss: a running sum and step count on the device (one host sync
        # per epoch). Not a list of per-step scalars: one tiny long-lived tensor per step
        # pinned the heap above online training's large transient blocks (resident
        # memory grew ~3 MB per layer step). MSE >= 0, so a non-finite step leaves the sum
        # non-finite.
        self.loss_sum = torch.zeros((), device=self.device)
        self.loss_steps = 0
        self.tok = 0
        self.history: list[dict[str, Any]] = []
        self.status = "finished"
        self.first: dict[str, float] | None = None
        self.best: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] = {}

    # -- RNG: each layer draws its dropout masks from its own stream, so layers trained side by
    # side (online) draw exactly what they draw trained one after another (shards)
    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        cuda = self.device.type == "cuda"
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.device) if cuda else None

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        if not self.kern.training or not self.kern.cfg.dropout:
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.rng[0])
            if devices:
                torch.cuda.set_rng_state(self.rng[1], self.device)
            yield
            self.rng = self._rng_state()

    @property
    def stopped(self) -> bool:
        return self.status != "finished"

    # -- training
    def step(
        self,
        b: dict[str, torch.Tensor],
        w: dict[str, torch.Tensor],
        window: int | None,
        max_evicted: int | None = None,
        weight: float = 1.0,
    ) -> None:
        """One optimiser step on batch ``b`` (q, k, v + the objective's fixed part). Data
        parallel: ``weight`` = this rank's share of the global batch × world size, so that the
        averaged gradients are those of the global batch's mean loss."""
        with self._own_rng():
            loss = layer_loss(self.kern, b, w, window, self.budget, max_evicted)
        self.opt.zero_grad(set_to_none=True)
        (loss * weight if weight != 1.0 else loss).backward()
        if self.reduce is not None:
            self.reduce([p.grad for p in self.kern.parameters()])
        self.opt.step()
        self.loss_sum += loss.detach()
        self.loss_steps += 1
        self.tok += b["q"].shape[0] * b["q"].shape[2]

    def empty_step(self) -> None:
        """Data parallel: a step in which this rank holds no row of the batch (zero gradients,
        still averaged with the other ranks')."""
        for p in self.kern.parameters():
            p.grad = torch.zeros_like(p)
        if self.reduce is not None:
            self.reduce([p.grad for p in self.kern.parameters()])
        self.opt.step()

    def end_epoch(self, epoch: int) -> bool:
        """Close an epoch's steps: False (and the layer stops) if a loss was not finite."""
        self.epoch_loss = self.loss_sum / max(self.loss_steps, 1)
        self.loss_sum, self.loss_steps = torch.zeros((), device=self.device), 0
        finite = torch.isfinite(self.epoch_loss).to(torch.float32).reshape(1)
        if self.reduce is not None:  # every rank agrees (the mean of the flags is 1)
            self.reduce([finite])
        if float(finite) != 1.0:
            self.status = f"stopped: non-finite loss at epoch {epoch}"
            return False
        self.sched.step()
        return True

    # -- validation: val_begin, val_add per batch, val_end
    def val_begin(self) -> None:
        self.kern.eval()
        self._sums = torch.zeros(3, device=self.device)
        self._n = 0

    def val_add(
        self,
        b: dict[str, torch.Tensor],
        w: dict[str, torch.Tensor],
        window: int | None,
        max_evicted: int | None = None,
    ) -> None:
        """Add one validation batch (with ``baseline`` and ``plus``) to the sums on the device."""
        with torch.no_grad():
            k = b["q"].shape[0]
            pred = predict(self.kern, b, w, window, max_evicted)
            self._sums += k * torch.stack(
                [
                    rows_mse(pred, b["target"], self.budget),
                    rows_mse(b["baseline"].to(pred.dtype), b["target"], self.budget),
                    rows_mse(b["plus"].to(pred.dtype), b["target"], self.budget),
                ]
            )
        self._n += k

    def val_end(self) -> dict[str, float]:
        """Mean per-sequence MSE of LESS, Baseline, Baseline+ (one host sync)."""
        self.kern.train()
        less, base, plus = (self._sums / self._n).tolist()
        return {"less": less, "baseline": base, "baseline_plus": plus}

    # -- the record and best epoch
    def record(self, epoch: int, val: dict[str, float]) -> None:
        """Validation after ``epoch`` (0: before training); keeps the best epoch's state."""
        if epoch == 0:
            self.first = val
        else:
            self.history.append(
                {
                    "epoch": epoch,
                    "train_mse": float(self.epoch_loss),
                    "val_mse": val["less"],
                    "val_baseline_mse": val["baseline"],
                    "val_baseline_plus_mse": val["baseline_plus"],
                }
            )
        if epoch == 0 or val["less"] < self.best["val_mse"]:
            self.best = {"val_mse": val["less"], "epoch": epoch}
            self.best_state = {k: v.detach().clone() for k, v in self.kern.state_dict().items()}

    def log_line(self, rate: float, where: str) -> str:
        h = self.history[-1]
        return (
            f"layer {self.layer:3d} epoch {h['epoch']:3d}  train {h['train_mse']:.4e}  "
            f"val LESS {h['val_mse']:.4e}  Baseline {h['val_baseline_mse']:.4e}  "
            f"Baseline+ {h['val_baseline_plus_mse']:.4e}  {rate:,.0f} tok/s ({where})"
        )

    def finish(self) -> dict[str, Any]:
        """Load the best epoch's state; the layer's metrics (checkpoints adds its file)."""
        self.kern.load_state_dict(self.best_state)
        assert self.first is not None
        return {
            "layer": self.layer,
            "status": self.status,
            "best_epoch": self.best["epoch"],
            "val_less_mse": self.best["val_mse"],
            "val_baseline_mse": self.first["baseline"],
            "val_baseline_plus_mse": self.first["baseline_plus"],
            "val_untrained_mse": self.first["less"],
            "history": self.history,
        }
