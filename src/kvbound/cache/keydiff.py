"""``keydiff``: keep the most distinctive keys (Park et al. 2025).

"KeyDiff: Key Similarity-Based KV Cache Eviction for Long-Context LLM Inference in
Resource-Constrained Environments", https://arxiv.org/abs/2504.15364. Per KV head the anchor is
the mean of the normalized keys the layer holds plus the step's new ones,
``a = mean_i k_i/||k_i||``, and ``score_i = -cos(k_i, a)``: the keys most similar to the anchor
(redundant) are evicted, the distinctive ones kept. The anchor depends on the keys held, so the
scores are recomputed on every step that overflows the budget.

The score needs no query and no attention weights, so it runs with any attention implementation.
The paper evicts block-wise while it prefills a long prompt in blocks of 128 tokens; kvbound's
block is the prefill chunk (``kvbound bench --prefill-chunk 128`` / ``--chunk 128`` reproduces the
paper's), and while decoding it evicts every step that overflows. Option ``window`` (default 0,
as the paper) always keeps the newest tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .evicting import EvictingCache, EvictingLayer, ScoredOptions
from .knorm import check_window
from .registry import register


@dataclass
class KeyDiffOptions(ScoredOptions):
    window: int = 0  # newest tokens always kept (the paper keeps none)


def keydiff_scores(keys: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``-cos(k_i, mean_j k_j/||k_j||)`` per KV head: ``[B, kv_heads, n, D]`` -> ``[B, kv_heads, n]`` float32.
    ``valid`` ``[B, kv_heads, n]`` (ragged heads): the anchor is the mean over each head's own keys only."""
    keys = keys.float()
    normed = F.normalize(keys, dim=-1)
    if valid is None:
        anchor = normed.mean(dim=-2, keepdim=True)
    else:
        weight = valid.unsqueeze(-1).to(normed.dtype)
        anchor = (normed * weight).sum(dim=-2, keepdim=True) / weight.sum(dim=-2, keepdim=True).clamp(min=1)
    return -F.cosine_similarity(keys, anchor, dim=-1)


class KeyDiffLayer(EvictingLayer):
    def select(self, keys, positions, query, query_pos, mass=None):
        if keys.shape[-2] <= self.capacity:
            return None
        return self.keep(keydiff_scores(keys, self._valid), protect_last=self.cache.options.window)


@register("keydiff", "lossy: KeyDiff (Park et al. 2025) -- keeps the keys least similar to the mean key; needs no query",
          exact=False, options=KeyDiffOptions, beams=True,
          paper="Park, Jones, Morse, Goel, Lee, Lott 2025, https://arxiv.org/abs/2504.15364")
class KeyDiffCache(EvictingCache):
    layer_cls = KeyDiffLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        check_window(opts, budget, "keydiff")
        super().__init__(model, budget, opts)
