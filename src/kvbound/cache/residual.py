"""``residual``: exact bounded-memory cache that rebuilds evicted K/V from per-layer residuals.

The per-layer variant of KV-Direct ("The Residual Stream Is All You Need", 2026): for every
token the cache stores the pre-norm residual entering each layer, and rebuilds an evicted
token's K/V at layer ``l`` by projection only (``input_layernorm -> k/v_proj -> k_norm ->
RoPE`` at the original positions, :meth:`~kvbound.recompute.LayerDriver.project_kv`), with
no attention recompute.

A token's residual must be kept from the step it is seen, because it is needed when the
token leaves the hot window steps later. Memory, honestly split in ``bytes_by_tier``:

* ``hot_kv`` -- K/V of the ``budget`` most recent tokens per layer;
* ``checkpoints`` -- residuals of evicted tokens still reachable by attention;
* ``pending_residuals`` -- residuals of tokens that are still hot;
* ``residual_slack`` -- unused capacity of the residual buffers (grown by a quarter at a
  time, so an append is not a full copy each step).

It pays only when ``d_model < 2 * kv_heads * head_dim`` (multi-head attention); for GQA models
(SmolLM2: 576 vs 384 numbers per token per layer) residuals cost more than the K/V they replace.
Sliding-window layers keep residuals only for tokens still inside their window.

Under kvbound's tiered attention (float32) the evicted span is handed over as lazy blocks of
:data:`PROJECT_CHUNK` tokens, each projected only when attention reaches it, so a step never holds
the span's K/V at once; otherwise it is projected ``PROJECT_CHUNK`` rows at a time into one tensor.
With the chunk equal to the prefill chunk (1024 by default) a prompt's rows are projected in the
same groups as the forward pass that computed them: bit-identical K/V.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

from .. import attention
from ..errors import KVBoundError
from .base import KVBoundCache, kv_bytes, nbytes
from .recall import RecallLayer, RecomputingCache
from .registry import register

PROJECT_CHUNK = 1024  # tokens projected per block (as kvbound.generation.DEFAULT_PREFILL_CHUNK)


class ResidualStore:
    """Residuals of tokens ``lo .. lo+n`` for one layer, in a buffer grown by a quarter at a time."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None  # [batch, capacity, d]
        self.lo = 0  # token index of the first live row
        self.head = 0  # buffer row of token ``lo``
        self.n = 0  # live rows

    def append(self, hidden: torch.Tensor) -> None:
        steps = hidden.shape[-2]
        if self.buf is not None and hidden.shape[0] != self.buf.shape[0]:
            raise KVBoundError(f"batch size changed from {self.buf.shape[0]} to {hidden.shape[0]} on one cache; "
                               "use a new cache per batch")
        if self.buf is None or self.head + self.n + steps > self.buf.shape[1]:
            live = self.n + steps
            cap = live + max(64, live // 4)  # grow by a quarter: slack <= 20% of the buffer
            buf = hidden.new_empty((hidden.shape[0], cap, hidden.shape[-1]))
            if self.buf is not None:
                buf[:, : self.n] = self.buf[:, self.head: self.head + self.n]
            self.buf, self.head = buf, 0
        self.buf[:, self.head + self.n: self.head + self.n + steps] = hidden
        self.n += steps

    def drop_before(self, token: int) -> None:
        """Forget tokens older than ``token`` (never needed again)."""
        k = min(self.n, max(0, token - self.lo))
        self.lo, self.head, self.n = self.lo + k, self.head + k, self.n - k

    def keep_until(self, token: int) -> None:
        """Forget tokens from ``token`` on (rows of an interrupted forward pass)."""
        self.n = max(0, min(self.n, token - self.lo))

    def rows(self, start: int, end: int) -> torch.Tensor:
        return self.buf[:, self.head + start - self.lo: self.head + end - self.lo]

    def row_bytes(self) -> int:
        """Bytes of one token's residual (every sequence of the batch)."""
        return 0 if self.buf is None else self.buf.shape[0] * self.buf.shape[-1] * self.buf.element_size()

    def split_bytes(self, first_hot: int) -> tuple[int, int, int]:
        """(evicted, hot, unused) bytes of the buffer."""
        if self.buf is None:
            return 0, 0, 0
        row = self.row_bytes()
        evicted = max(0, min(self.n, first_hot - self.lo))
        return evicted * row, (self.n - evicted) * row, nbytes(self.buf) - self.n * row


class ResidualLayer(RecallLayer):
    """Hot-window layer that stores each token's input residual for later projection."""

    def __init__(self, cache: KVBoundCache, layer_idx: int, sliding_window: int | None, hot: int) -> None:
        super().__init__(cache, layer_idx, sliding_window, hot)
        self.store = ResidualStore()
        # a sliding layer whose hot window covers its whole attention window never recalls
        self.keeps_residuals = sliding_window is None or self.hot < sliding_window - 1

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = super().update(key_states, value_states, *args, **kwargs)
        self.store.drop_before(self.needed_start())
        return out

    def recall_blocks(self, start: int, end: int, like: torch.Tensor) -> list:
        if not self.attends_tiered(like):
            return [self.recall(start, end, like)]
        step = PROJECT_CHUNK
        blocks = [attention.LazyBlock(min(step, end - a), partial(self.cache.project, self, a, min(a + step, end)))
                  for a in range(start, end, step)]
        # alive together at a block's load: its residual rows normed, its K/V, and the hot + new K/V
        rows = min(step, end - start)
        self.cache.note_transient(rows * self.store.row_bytes() + kv_bytes(like, rows) + self.handover_bytes(0, like))
        return blocks

    def map_spilled(self, fn) -> None:
        if self.store.buf is not None:  # [batch, capacity, d]: every row follows its sequence
            self.store.buf = fn(self.store.buf)

    def reset_spilled(self) -> None:
        self.store = ResidualStore()

    def truncate(self, n: int) -> None:
        """Roll back ``n`` tokens (speculative decoding); refused when attention would then
        need residuals this layer already dropped (sliding-window layers)."""
        new_seen = self.seen - n
        first_hot = min(self.seen - self.held(), new_seen)
        need = 0 if self.sliding_window is None else max(0, new_seen - (self.sliding_window - 1))
        if need < first_hot and (not self.keeps_residuals or need < self.store.lo):
            raise KVBoundError(f"policy 'residual' cannot roll back {n} tokens on sliding-window layer "
                               f"{self.layer_idx} (their residuals are gone); use kv-direct or offload")
        super().truncate(n)

    def tiers(self) -> dict[str, int]:
        evicted, hot, unused = self.store.split_bytes(self.seen - self.held())
        return {**super().tiers(), "checkpoints": evicted, "pending_residuals": hot, "residual_slack": unused}


@register("residual", "exact: hot window of `budget` tokens; older K/V projected from stored per-layer residuals",
          exact=True, can_rollback=True, beams=True)
class ResidualCache(RecomputingCache):
    layer_cls = ResidualLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        super().__init__(model, budget, self.parse_options(options))

    def observe_layer_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        super().observe_layer_input(layer_idx, hidden_states, kwargs)
        layer = self.layers[layer_idx]
        if layer.keeps_residuals:
            layer.store.keep_until(layer.seen)  # rows of an interrupted pass, if any
            layer.store.append(hidden_states)

    @torch.no_grad()
    def project(self, layer: ResidualLayer, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of tokens ``start .. end`` at ``layer``, projected from their stored residuals."""
        residual = layer.store.rows(start, end)
        positions = torch.arange(start, end, device=residual.device).unsqueeze(0)
        return self.driver.project_kv(layer.layer_idx, residual, positions, PROJECT_CHUNK)

    def rebuild(self, layer: ResidualLayer, start: int, end: int, like: torch.Tensor):
        """Exact K/V of tokens ``start .. end`` at ``layer`` in one tensor (attention without tiers)."""
        k, v = self.project(layer, start, end)
        # alive together: one chunk's normed residual inside project_kv, the rebuilt K/V and
        # what update() builds for attention from them, the hot K/V and the new K/V.
        self.note_transient(min(end - start, PROJECT_CHUNK) * layer.store.row_bytes() + nbytes(k, v)
                            + layer.handover_bytes(nbytes(k, v), like))
        return k, v
