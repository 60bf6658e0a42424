"""``window``: keep only the most recent ``budget`` tokens (window attention, lossy)."""

from __future__ import annotations

from typing import Any

from .base import KVBoundCache
from .model_info import layer_windows
from .registry import register
from .hot_window import HotWindowLayer


@register("window", "lossy: keeps only the K/V of the most recent `budget` tokens", exact=False,
          can_draft=True, beams=True)
class WindowCache(KVBoundCache):
    def __init__(self, model, budget: int, **options: Any) -> None:
        self.options = self.parse_options(options)
        layers = [HotWindowLayer(self, i, w, budget) for i, w in enumerate(layer_windows(model))]
        super().__init__(model, budget, layers)
