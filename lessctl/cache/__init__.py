"""A real-eviction KV cache for a sparse policy plus the LESS low-rank state.

:class:`EvictingCache` is a ``transformers`` :class:`~transformers.cache_utils.Cache` made of one
:class:`EvictingLayer` per decoder layer (as the library's own caches are built). Per layer and
KV head it holds only the kept tokens, physically (:class:`~lessctl.cache.store.KeptStore`):
post-RoPE keys and values, each kept token's position in its own sequence, the policy's running
scores (H2O) and the :class:`~lessctl.less.state.LowRankState` of the evicted ones.

Work split: ``update`` (called by the attention module with the new post-RoPE K/V) only hands
the new K/V through; the registered attention function :meth:`EvictingCache.attention`
(installed by :meth:`EvictingCache.attached`) evicts and attends, because eviction may need the
current query (TOVA) and folds the evicted key into the state through psi. Semantics equal the
parallel form (:mod:`lessctl.policies.base`, "evict, then attend"), row by row:

1. the new key ``t`` is appended as the last candidate;
2. if the row holds more than ``n`` candidates, the policy evicts (``select_evict``); evicted
   tokens are added to the state through ``psi(k)`` and leave memory;
3. row ``t`` attends over the kept K/V plus the state;
4. an accumulating policy adds row ``t``'s probabilities over its kept keys to its scores.

Protocols (``protocol=``), i.e. when a forward's rows evict:

- ``"streaming"``: every token, prompt included, is one such row (a forward of T tokens runs the
  T rows in order inside each layer, which is exactly T one-token forwards).
- ``"prompt"`` (the paper's generation protocol): the first forward (the prompt, T tokens) uses
  full causal attention and caches all of it (H2O scores: full-attention probabilities summed
  over the prompt rows, through ``policy.accumulate``; SnapKV counts only its observation
  window, the rows before the first eviction at ``first_evict = max(prompt length, budget)``).
  The first decoded row then evicts the whole excess at once, i.e. the ``T + 1 - n``
  candidates the policy would drop one after another from that candidate set (``select_evict``
  repeated on the shrinking set; :func:`evict_many` uses an equivalent sort for policies with
  ``eviction_scores``), all folded into the state; from then on one token per row.
- ``"chunked"`` (``chunk=C``, prompts larger than memory): rows go in chunks of C; a chunk
  evicts at its first row (the kept keys plus that row's key, down to the budget, folded into
  the state), then its rows attend causally over the kept keys, the chunk's keys and the state,
  as a prompt does. The cache never holds more than ``n + C`` tokens, so with
  :func:`prefill` (one forward per chunk) a prompt of any length needs the memory of
  ``n + C``. ``C = 1`` is ``streaming``; ``C >=`` the prompt is ``prompt``.

Steady state: once every sequence's cache is full, a one-token forward is
:func:`~lessctl.cache.step.steady_step` (fixed shapes, in place, no host synchronisation, the
state as ``R`` virtual keys inside one attention call); growing, padded, bulk and chunk rows take
the general path (:mod:`lessctl.cache.driver`, :func:`~lessctl.cache.attend.rows_attention`).

Sliding windows (the layer's ``sliding_window``, module :mod:`lessctl.policies.base`): before
row ``t`` evicts, a kept key ``t - w`` *expires*: it leaves memory without entering the state and
takes the place of the policy's eviction at that row; a key the policy folded into the state
while inside the window is taken out of it again at row ``j + w`` (the layer keeps such keys'
K/V until then, at most ``w - n`` tokens). Soft-capping (``softcap``) and the layer's
``scaling`` apply to every logit. ``chunked`` with a state on a sliding layer is refused.

Batches: left padding only (``attention_mask`` given to the constructor). Padding tokens are
never cached as candidates, never count towards budgets or scores, and positions are per
sequence, so every sequence decides exactly as it would alone.
"""

from lessctl.cache.evicting import EvictingCache, cache_nbytes, prefill, running
from lessctl.cache.eviction import evict_many, evict_many_sequential
from lessctl.cache.layer import PROTOCOLS, EvictingLayer
from lessctl.cache.store import KeptStore, left_pad_counts

__all__ = [
    "PROTOCOLS",
    "EvictingCache",
    "EvictingLayer",
    "KeptStore",
    "cache_nbytes",
    "evict_many",
    "evict_many_sequential",
    "left_pad_counts",
    "prefill",
    "running",
]
