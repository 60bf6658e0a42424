"""``full``: the uncompressed reference cache (what transformers' ``DynamicCache`` keeps)."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .base import KVBoundCache, PolicyLayer
from .model_info import layer_windows
from .registry import register


class FullLayer(PolicyLayer, DynamicLayer):
    """Keeps every token's K/V, exactly like ``DynamicLayer``."""

    def __init__(self, cache: KVBoundCache, layer_idx: int) -> None:
        DynamicLayer.__init__(self)
        self._init_policy(cache, layer_idx, None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = DynamicLayer.update(self, key_states, value_states)
        self.seen += key_states.shape[-2]
        self.cache.account(self.layer_idx)
        return out

    def truncate(self, n: int) -> None:
        DynamicLayer.crop(self, -n)
        self.seen -= n
        self.cache.account(self.layer_idx)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return DynamicLayer.get_mask_sizes(self, query_length)


class FullSlidingLayer(PolicyLayer, DynamicSlidingWindowLayer):
    """Gemma-style sliding-window layer: transformers' own class, plus accounting."""

    def __init__(self, cache: KVBoundCache, layer_idx: int, sliding_window: int) -> None:
        DynamicSlidingWindowLayer.__init__(self, sliding_window)
        self._init_policy(cache, layer_idx, sliding_window)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = DynamicSlidingWindowLayer.update(self, key_states, value_states)
        self.seen = self.cumulative_length
        self.cache.account(self.layer_idx)
        return out

    def get_seq_length(self) -> int:
        return DynamicSlidingWindowLayer.get_seq_length(self)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return DynamicSlidingWindowLayer.get_mask_sizes(self, query_length)

    def get_max_length(self) -> int:
        return DynamicSlidingWindowLayer.get_max_length(self)


@register("full", "reference: keeps every token's K/V (same as transformers' DynamicCache)", exact=True, needs_budget=False,
          can_rollback=True, beams=True)
class FullCache(KVBoundCache):
    def __init__(self, model, budget: int | None = None, **options: Any) -> None:
        self.options = self.parse_options(options)
        layers = [
            FullLayer(self, i) if w is None else FullSlidingLayer(self, i, w)
            for i, w in enumerate(layer_windows(model))
        ]
        super().__init__(model, budget, layers)
