"""``snapkv``: SnapKV (Li et al. 2024) -- an observation window votes for the tokens to keep.

The queries of the newest ``window`` tokens vote: each older token's score is the attention
they give it (softmax over the held keys, causal), summed over the window's queries and the
query heads of each KV head's group, then smoothed by 1-D max pooling (``kernel``, 1 = off).
Each KV head keeps the window's own tokens plus its top-scoring older tokens. At prefill the
window is the prompt's last ``window`` positions; during decoding the same scoring runs on the
newest window (its queries are kept, a ``queries`` memory tier) whenever a step overflows the
budget. If ``budget <= window`` only the newest ``budget`` tokens fit and SnapKV keeps exactly
what ``window`` would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .base import nbytes
from .checks import check_int
from .codec import CodecOptions
from .evicting import EvictingCache, EvictingLayer, attention_mass, keep_top, pool_votes
from .registry import register


@dataclass
class SnapKVOptions(CodecOptions):
    window: int = 32  # observation window: newest queries that vote (and tokens always kept)
    kernel: int = 7  # max-pooling kernel over the votes (odd; 1 disables pooling)


def snapkv_scores(votes: torch.Tensor, protect: int, kernel: int) -> torch.Tensor:
    """Pooled votes for the older tokens, +inf for the ``protect`` newest (the window)."""
    n = votes.shape[-1]
    pooled = pool_votes(votes[..., :n - protect], kernel)
    return torch.cat([pooled, torch.full_like(votes[..., n - protect:], float("inf"))], dim=-1)


class SnapKVLayer(EvictingLayer):
    batch_state = (*EvictingLayer.batch_state, "window_query")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.window_query: torch.Tensor | None = None  # [B, heads, <= window, D]
        self.window_pos: torch.Tensor | None = None

    def query_rows(self, new: int) -> int:
        return min(self.cache.options.window, new)

    def policy_tiers(self) -> dict[str, int]:
        return {"queries": nbytes(self.window_query, self.window_pos)}

    def reset_policy(self) -> None:
        self.window_query = self.window_pos = None

    def select(self, keys, positions, query, query_pos, mass=None):
        window = self.cache.options.window
        older = 0  # stored queries still in the window
        if self.window_query is not None:
            older = min(self.window_query.shape[-2], window - query.shape[-2]) if query.shape[-2] < window else 0
            query = torch.cat([self.window_query, query], dim=-2)
            query_pos = torch.cat([self.window_pos, query_pos])
        self.window_query, self.window_pos = query[..., -window:, :].clone(), query_pos[-window:].clone()
        n = keys.shape[-2]
        if n <= self.capacity:
            return None
        if mass is None:  # score the whole window
            votes = attention_mass(self.window_query, self.window_pos, keys, positions, self.scaling(), self.cache.softcap)
        else:  # the step's rows come from the model's attention; stored rows are scored here
            votes = mass
            if older:
                votes = votes + attention_mass(self.window_query[..., :older, :], self.window_pos[:older], keys,
                                               positions, self.scaling(), self.cache.softcap)
        scores = snapkv_scores(votes, min(window, self.capacity), self.cache.options.kernel)
        return keep_top(scores, self.capacity)


@register("snapkv", "lossy: SnapKV (Li et al. 2024) -- the last `window` queries vote (max-pooled) for tokens to keep",
          exact=False, options=SnapKVOptions, beams=True)
class SnapKVCache(EvictingCache):
    layer_cls = SnapKVLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        check_int(opts.window, "window", "snapkv", 1)
        check_int(opts.kernel, "kernel", "snapkv", 1)
        if opts.kernel % 2 == 0:
            raise KVBoundError(f"snapkv option kernel must be odd (same-length pooling), got {opts.kernel}")
        super().__init__(model, budget, opts)
