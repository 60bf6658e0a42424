"""``think``: ThinK (Xu et al. 2024, https://arxiv.org/abs/2407.21018) alone -- every token is kept,
the older keys lose the ``ratio`` fraction of their channels with the least query-driven magnitude.

The rule, the storage and why attention stays exact over the kept channels are in
:mod:`kvbound.cache.channels`. With a token-eviction policy use its ``think`` option instead
(``--policy snapkv --budget 512 --option think=0.5``): ThinK then prunes the channels of the keys
that policy keeps.

Options: ``ratio`` (fraction of each head's key channels pruned, in (0, 1); 0.5 keeps half),
``window`` (observation window: the newest queries that score the channels, and the newest keys kept
at full width). No budget: the cache grows with the context like ``full``, at
``(1 - ratio / 2)`` of its bytes once the context is much longer than ``window``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from ..errors import KVBoundError
from .channels import WINDOW
from .checks import check_int
from .evicting import EvictingCache, EvictingLayer
from .registry import register


@dataclass
class ThinKOptions:
    ratio: float = 0.5  # fraction of each KV head's key channels pruned (ThinK's lambda)
    window: int = WINDOW  # observation window: newest queries that score channels, newest keys kept at full width


class KeepAllLayer(EvictingLayer):
    """Keeps every token (the model's sliding window on sliding layers): ThinK prunes channels only."""

    def __init__(self, cache: EvictingCache, layer_idx: int, sliding_window: int | None, budget: int | None) -> None:
        super().__init__(cache, layer_idx, sliding_window, sys.maxsize if budget is None else budget)

    def select(self, keys, positions, query, query_pos, mass=None):
        return None


@register("think", "lossy: ThinK (Xu et al. 2024) -- keeps every token, prunes `ratio` of each head's key channels",
          exact=False, needs_budget=False, options=ThinKOptions, beams=True,
          paper="Xu et al. 2024, https://arxiv.org/abs/2407.21018")
class ThinKCache(EvictingCache):
    layer_cls = KeepAllLayer

    def __init__(self, model, budget: int | None = None, **options: Any) -> None:
        if budget is not None:
            raise KVBoundError("think keeps every token and takes no budget; for a token budget use an eviction "
                               "policy with ThinK on its kept keys, e.g. --policy snapkv --option think=0.5")
        opts = self.parse_options(options)
        check_int(opts.window, "window", "think", 1)
        super().__init__(model, None, opts)  # think_ratio checks ratio; the budget is ignored (every token kept)

    def layer_capacity(self, layer_idx: int, seen: int) -> int:
        return sys.maxsize  # no budget: every token kept
