"""``kv-direct``: exact bounded-memory cache that rebuilds evicted K/V from token ids.

After "The Residual Stream Is All You Need" (KV-Direct, 2026): every layer's K/V is a
deterministic function of the residual stream, and the layer-0 residual is a lookup of the
token id. So the cache keeps the K/V of the ``budget`` most recent tokens (the hot window,
see :class:`~kvbound.cache.hot_window.HotWindowLayer`) and, for older tokens, only their ids.

Each forward pass that needs evicted tokens rebuilds them layer by layer with the model's own
modules (:class:`~kvbound.recompute.LayerDriver`): the evicted span's residual starts as
``embed(ids)``, layer ``l`` turns it into layer ``l``'s K/V and the residual entering ``l+1``
(``chunk`` rows at a time, written over the residual in place); the K/V are handed to attention
and dropped before the next layer. Between forward passes the cache holds the hot K/V and the
ids; inside one pass it holds the span's residual, one layer's span K/V (on a sliding-window
layer only its window) and one chunk's transients (measured with :meth:`KVBoundCache.note_transient`).

Prefill by ids (:meth:`KVDirectCache.absorb_prompt`): a prompt's tokens before its last chunk
join the checkpoint without running the model; the last chunk's forward pass rebuilds them all
in one layer-by-layer pass. Feeding every prefill chunk through the model instead would rebuild
the growing span once per chunk (quadratic in the prompt).

Exactness: recomputation is bit-identical to the original forward when the span was computed
in forwards of the same rows (a chunked prefill with ``chunk`` tokens per pass, as
:func:`kvbound.generation.generate` runs by default); otherwise the matmul row grouping differs
and K/V differ in the last bits (~1e-6), which leaves greedy decoding token-identical in our tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .base import nbytes
from .recall import RecallLayer, RecomputingCache
from .registry import register


@dataclass
class KVDirectOptions:
    """``chunk``: rows per call of a layer when the evicted span is rebuilt. It bounds the
    rebuild's attention/MLP transients; equal to the prefill chunk (default 1024, as
    :data:`kvbound.generation.DEFAULT_PREFILL_CHUNK`) the prompt's K/V are rebuilt bit-identically."""

    chunk: int = 1024

    def __post_init__(self) -> None:
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise KVBoundError(f"kv-direct option chunk must be a whole number of tokens >= 1, got {self.chunk!r}")


@dataclass
class _Span:
    """Per-forward rebuild state: the evicted span's residual entering layer ``layer``."""

    forward: int
    end: int
    last: int
    layer: int
    hidden: torch.Tensor | None
    positions: torch.Tensor


@register("kv-direct", "exact: hot window of `budget` tokens; older K/V recomputed from token ids each step",
          exact=True, options=KVDirectOptions, can_rollback=True, beams=True, reruns_model=True,
          paper="The Residual Stream Is All You Need (KV-Direct), 2026")
class KVDirectCache(RecomputingCache):
    def __init__(self, model, budget: int, **options: Any) -> None:
        super().__init__(model, budget, self.parse_options(options))
        vocab = self.driver.base.embed_tokens.num_embeddings
        self._id_dtype = torch.int32 if vocab < 2**31 else torch.int64
        self.ids: torch.Tensor | None = None  # [batch, tokens seen]: the checkpoint
        self._forward = 0
        self._span: _Span | None = None

    # -- observations -----------------------------------------------------------------
    def observe_input_ids(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is None:
            raise KVBoundError("policy 'kv-direct' checkpoints token ids; call the model with input_ids, "
                               "not inputs_embeds (or use policy 'residual')")
        self._forward += 1
        self._span = None
        self._append_ids(input_ids)

    def _append_ids(self, input_ids: torch.Tensor) -> int:
        """Append ``input_ids`` after the tokens every layer has seen; returns that count."""
        committed = min(layer.seen for layer in self.layers)  # drops ids of an interrupted pass
        ids = input_ids.to(self._id_dtype)
        if self.ids is None or committed == 0:
            self.ids = ids.clone()
            return 0
        if ids.shape[0] != self.ids.shape[0]:
            raise KVBoundError(f"batch size changed from {self.ids.shape[0]} to {ids.shape[0]} on one cache; "
                               "use a new cache per batch")
        self.ids = torch.cat([self.ids[:, :committed], ids], dim=1)
        return committed

    def absorb_prompt(self, input_ids: torch.Tensor) -> bool:
        """Take prompt tokens by id alone: they become evicted tokens of every layer (the hot
        windows are emptied, so the evicted span stays a prefix), and the next forward pass
        rebuilds them with the rest of the span. Exact, and the whole prompt costs one pass."""
        if input_ids.shape[1] == 0:
            return True
        seen = self._append_ids(input_ids) + input_ids.shape[1]
        for layer in self.layers:
            if layer.is_initialized:
                layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]
            layer.seen = seen
            self.account(layer.layer_idx)
        self._span = None
        return True

    def map_batch_state(self, fn) -> None:
        if self.ids is not None:  # each sequence keeps its own history (beam search)
            self.ids = fn(self.ids)

    def reset_state(self) -> None:
        self.ids, self._span = None, None

    # -- recomputation ----------------------------------------------------------------
    def _start_span(self) -> _Span:
        """Plan this forward's rebuild: which tokens, up to which layer."""
        recalling = [(i, layer.seen - layer.held()) for i, layer in enumerate(self.layers)
                     if layer.seen - layer.held() > layer.needed_start()]
        end = max(first_hot for _, first_hot in recalling)
        positions = torch.arange(end, device=self.ids.device).unsqueeze(0)
        hidden = self.driver.embed(self.ids[:, :end].long())
        return _Span(self._forward, end, recalling[-1][0], 0, hidden, positions)

    @torch.no_grad()
    def rebuild(self, layer: RecallLayer, start: int, end: int, like: torch.Tensor):
        """Exact K/V of tokens ``start .. end`` at ``layer`` (called in layer order in one pass)."""
        span = self._span
        if span is None or span.forward != self._forward:
            span = self._span = self._start_span()
        l = layer.layer_idx
        if l < span.layer or end > span.end:
            raise RuntimeError(f"kv-direct: layer {l} asked for tokens {start}..{end} out of order")
        chunk = self.options.chunk
        while span.layer < l:  # layers that need no rebuild still move the span's residual up
            self.driver.run_layer(span.layer, span.hidden, span.positions, chunk, in_place=True)
            span.layer += 1
        if l == span.last:  # nothing above needs the residual: project the rows asked for only
            k, v = self.driver.project_kv(l, span.hidden[:, start:end], span.positions[:, start:end], chunk)
            span_kv = nbytes(k, v)
        else:  # k, v: K/V of the span's last k.shape[-2] tokens (a sliding layer keeps its window)
            _, k, v = self.driver.run_layer(l, span.hidden, span.positions, chunk, in_place=True)
            span_kv = nbytes(k, v)
            first = span.end - k.shape[-2]
            if start < first:
                raise RuntimeError(f"kv-direct: layer {l} asked for token {start}, its rebuild kept {first}..")
            k, v = k[..., start - first:end - first, :], v[..., start - first:end - first, :]
        # alive together at the peak of this layer's update: the span's residual, its K/V at this
        # layer (k, v are views of them) and what update() builds for attention.
        self.note_transient(nbytes(span.hidden) + span_kv + layer.handover_bytes(nbytes(k, v), like))
        span.layer = l + 1
        if l == span.last:
            self._span = None
        return k, v

    # -- memory -------------------------------------------------------------------------
    def extra_tiers(self) -> dict[str, int]:
        return {"checkpoints": nbytes(self.ids)}
