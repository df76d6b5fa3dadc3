"""Training LESS's kernels φ/ψ, one independent objective per layer (less-method.md §4).

- :mod:`.spec`: what is trained (kernel shapes, the spec that names the checkpoint folder);
- :mod:`.objective`: the per-layer loss as pure functions;
- :mod:`.sources`: where q, k, v come from (``shards`` on disk, ``online`` from the forward);
- :mod:`.loop`: one layer's optimiser, schedule, validation and best epoch;
- :mod:`.checkpoints`: the checkpoint folder (hashes, status, locks, loading);
- :mod:`.runner`: `lessctl train` itself.
"""

from lessctl.training.checkpoints import checkpoint_dir, load_checkpoint
from lessctl.training.runner import run, train_layer
from lessctl.training.spec import kernel_config, train_spec

__all__ = ["checkpoint_dir", "kernel_config", "load_checkpoint", "run", "train_layer", "train_spec"]
