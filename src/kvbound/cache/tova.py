"""``tova``: Token Omission Via Attention (Oren et al. 2024).

When a layer holds more than ``budget`` tokens, the tokens with the lowest attention from the
current query, averaged over all heads, are evicted (one per decoding step; the new token
itself can be evicted). All heads of a layer keep the same tokens (with ``allocation=ada`` each KV
head ranks by the mean over its own query heads, so heads keep different tokens and numbers). For a multi-token step
(a prefill longer than the budget) the step's last query ranks the tokens. Attention is
computed only on steps that evict.
"""

from __future__ import annotations

from typing import Any

from .evicting import EvictingCache, EvictingLayer, ScoredOptions, attention_mass
from .registry import register


class TOVALayer(EvictingLayer):
    def query_rows(self, new: int) -> int:
        if self.cache.allocation == "ada":  # heads may grow past the mean: every step can evict
            return 1
        return 1 if self.held() + new > self.cache.layer_capacity(self.layer_idx, self.seen + new) else 0

    def select(self, keys, positions, query, query_pos, mass=None):
        if keys.shape[-2] <= self.capacity and self.cache.allocation != "ada":
            return None
        if mass is None or query.shape[-2] > 1:  # more rows than the last (cake measured the window)
            mass = attention_mass(query[:, :, -1:], query_pos[-1:], keys, positions, self.scaling(),
                                  self.cache.softcap)
        if self.cache.allocation == "ada":  # per KV head, so heads can differ: mean over its query heads
            return self.keep(mass * (mass.shape[1] / query.shape[1]))
        return self.keep(mass.sum(dim=1, keepdim=True) / query.shape[1])  # mean over query heads: [B, 1, n]


@register("tova", "lossy: TOVA (Oren et al. 2024) -- evicts the token the current query attends to least",
          exact=False, options=ScoredOptions, beams=True, paper="Oren et al. 2024, https://arxiv.org/abs/2401.06104")
class TOVACache(EvictingCache):
    layer_cls = TOVALayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        super().__init__(model, budget, self.parse_options(options))
