"""``streaming``: StreamingLLM (Xiao et al. 2023) -- attention sinks plus a recent window.

Keeps the first ``sinks`` tokens and the most recent ``budget - sinks`` tokens. Unlike the
paper, kept tokens keep their original RoPE positions (kvbound never re-rotates keys); the paper
re-assigns positions inside the cache. On Gemma 3 sliding layers the recent suffix alone is
kept (see :mod:`kvbound.cache.evicting`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .checks import check_int
from .codec import encode_kv
from .evicting import EvictingCache, EvictingLayer, EvictingOptions
from .registry import register


@dataclass
class StreamingOptions(EvictingOptions):
    sinks: int = 4  # initial "attention sink" tokens always kept


class StreamingLayer(EvictingLayer):
    def select(self, keys, positions, query, query_pos):
        n, cap = keys.shape[-2], self.capacity
        if n <= cap:
            return None
        sinks = self.cache.options.sinks
        idx = torch.cat([torch.arange(sinks, device=keys.device),
                         torch.arange(n - (cap - sinks), n, device=keys.device)])
        return idx.view(1, 1, -1)

    def adopt_recent(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Restart from exact K/V (draft of :mod:`kvbound.speculative`): keep the sinks held
        now, fill the rest of the capacity with the last tokens of ``keys``/``values`` (the
        K/V of tokens ``seen - n .. seen``). Held tensors are replaced, never written."""
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        sinks = 0 if self.is_sliding else self.cache.options.sinks
        n = min(keys.shape[-2], self.capacity)
        kept = int((self.positions[0, 0] < min(sinks, seen - n)).sum()) if self.held() else 0
        n = min(n, self.capacity - kept)
        b, h = keys.shape[:2]
        recent = torch.arange(seen - n, seen, device=keys.device).expand(b, h, n)
        new_k, new_v = encode_kv(self.cache.codec, keys[..., keys.shape[-2] - n:, :], values[..., values.shape[-2] - n:, :])
        self.keys = torch.cat([self.keys[..., :kept, :], new_k], dim=-2)
        self.values = torch.cat([self.values[..., :kept, :], new_v], dim=-2)
        self.positions = torch.cat([self.positions[..., :kept], recent], dim=-1)
        self.seen = seen
        self.cache.account(self.layer_idx)


@register("streaming", "lossy: StreamingLLM (Xiao et al. 2023) -- `sinks` first tokens + the most recent ones",
          exact=False, options=StreamingOptions, can_draft=True, beams=True,
          paper="Xiao et al. 2023, https://arxiv.org/abs/2309.17453")
class StreamingCache(EvictingCache):
    layer_cls = StreamingLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        check_int(opts.sinks, "sinks", "streaming", 0)
        if budget <= opts.sinks:
            raise KVBoundError(f"streaming needs budget > sinks, got budget {budget} and sinks {opts.sinks}")
        super().__init__(model, budget, opts)
