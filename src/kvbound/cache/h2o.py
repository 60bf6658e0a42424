"""``h2o``: Heavy-Hitter Oracle (Zhang et al. 2023) -- accumulated attention + a recent window.

Every step (prefill and decode) the attention probabilities of the step's queries are added to
each held token's score, per KV head, summed over the query heads of its group. When a layer
holds more than ``budget`` tokens it keeps the ``recent`` newest tokens plus the
``budget - recent`` highest-scoring older ones, independently per KV head; a kept token keeps
its accumulated score. A prefill longer than the budget is scored with all of its queries
(causal) before the first eviction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .base import nbytes
from .checks import check_int
from .evicting import EvictingCache, EvictingLayer, ScoredOptions, attention_mass
from .registry import register


@dataclass
class H2OOptions(ScoredOptions):
    recent: int | None = None  # newest tokens always kept; default budget // 2


class H2OLayer(EvictingLayer):
    token_state = {"scores": 2}

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.scores: torch.Tensor | None = None  # [B, kv_heads, held] accumulated attention

    def query_rows(self, new: int) -> int:
        return new

    def policy_tiers(self) -> dict[str, int]:
        return {"scores": nbytes(self.scores)}

    def reset_policy(self) -> None:
        self.scores = None

    def select(self, keys, positions, query, query_pos, mass=None):
        if mass is None:
            mass = attention_mass(query, query_pos, keys, positions, self.scaling(), self.cache.softcap)
        old = self.scores if self.scores is not None else mass.new_zeros(*mass.shape[:2], 0)
        self.scores = torch.cat([old, old.new_zeros(*old.shape[:2], mass.shape[-1] - old.shape[-1])], dim=-1) + mass
        return self.keep(self.scores, protect_last=self.cache.options.recent)  # the base gathers self.scores too


@register("h2o", "lossy: H2O (Zhang et al. 2023) -- heavy hitters by accumulated attention + `recent` newest tokens",
          exact=False, options=H2OOptions, beams=True, paper="Zhang et al. 2023, https://arxiv.org/abs/2306.14048")
class H2OCache(EvictingCache):
    layer_cls = H2OLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        if opts.recent is None:
            opts.recent = budget // 2
        check_int(opts.recent, "recent", "h2o", 0)
        if opts.recent > budget:
            raise KVBoundError(f"h2o option recent must be <= budget ({budget}), got {opts.recent}")
        super().__init__(model, budget, opts)

    def protected_tokens(self) -> int:
        return self.options.recent
