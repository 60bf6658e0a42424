"""``tova``: Token Omission Via Attention (Oren et al. 2024).

When a layer holds more than ``budget`` tokens, the tokens with the lowest attention from the
current query, averaged over all heads, are evicted (one per decoding step; the new token
itself can be evicted). All heads of a layer keep the same tokens. For a multi-token step
(a prefill longer than the budget) the step's last query ranks the tokens. Attention is
computed only on steps that evict.
"""

from __future__ import annotations

from typing import Any

from .registry import register
from .evicting import EvictingCache, EvictingOptions, EvictingLayer, attention_mass, keep_top


class TOVALayer(EvictingLayer):
    def query_rows(self, new: int) -> int:
        return 1 if self.held() + new > self.capacity else 0

    def select(self, keys, positions, query, query_pos, mass=None):
        if keys.shape[-2] <= self.capacity:
            return None
        if mass is None:
            mass = attention_mass(query, query_pos, keys, positions, self.scaling(), self.cache.softcap)
        score = mass.sum(dim=1, keepdim=True) / query.shape[1]  # mean over query heads: [B, 1, n]
        return keep_top(score, self.capacity)


@register("tova", "lossy: TOVA (Oren et al. 2024) -- evicts the token the current query attends to least",
          exact=False, options=EvictingOptions, beams=True,
          paper="Oren et al. 2024, https://arxiv.org/abs/2401.06104")
class TOVACache(EvictingCache):
    layer_cls = TOVALayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        super().__init__(model, budget, self.parse_options(options))
