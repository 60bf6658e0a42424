"""Shared base of the recomputing exact policies (``kv-direct``, ``residual``).

A :class:`RecallLayer` is a hot window whose evicted tokens are rebuilt on demand by the owning
:class:`RecomputingCache` (``rebuild``), which drives the model's own modules through
:class:`~kvbound.recompute.LayerDriver` and refuses padded input.
"""

from __future__ import annotations

from typing import Any

import torch

from ..recompute import LayerDriver, check_supported
from .base import KVBoundCache
from .checks import check_unpadded
from .hooks import use_tiered_attention
from .hot_window import HotWindowLayer
from .model_info import first_full_layer, layer_windows


class RecallLayer(HotWindowLayer):
    """Hot-window layer whose evicted tokens are rebuilt by the owning cache."""

    recalls = True

    def recall(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.rebuild(self, start, end, like)


class RecomputingCache(KVBoundCache):
    """Base of the exact recomputing caches: one ``layer_cls`` hot window per layer, the
    model's :class:`LayerDriver`, the observation hooks, and unpadded input enforced."""

    layer_cls: type[RecallLayer] = RecallLayer

    def __init__(self, model, budget: int, options: Any) -> None:
        self.options = options
        check_supported(model)
        layers = [self.layer_cls(self, i, w, budget) for i, w in enumerate(layer_windows(model))]
        super().__init__(model, budget, layers)
        self.driver = LayerDriver(model)
        self.check_layer = first_full_layer(model) or 0
        use_tiered_attention(model)

    def observe_layer_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        if layer_idx == self.check_layer:
            check_unpadded(self, hidden_states, kwargs)

    def rebuild(self, layer: RecallLayer, start: int, end: int, like: torch.Tensor):
        """Exact K/V of tokens ``start .. end`` at ``layer``."""
        raise NotImplementedError
