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
from .base import parse_options, register
from .evicting import EvictingCache, EvictingLayer, check_int


@dataclass
class StreamingOptions:
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


@register("streaming", "lossy: StreamingLLM (Xiao et al. 2023) -- `sinks` first tokens + the most recent ones",
          exact=False)
class StreamingCache(EvictingCache):
    layer_cls = StreamingLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = parse_options(StreamingOptions, options, "streaming")
        check_int(opts.sinks, "sinks", "streaming", 0)
        if budget <= opts.sinks:
            raise KVBoundError(f"streaming needs budget > sinks, got budget {budget} and sinks {opts.sinks}")
        super().__init__(model, budget, opts)
