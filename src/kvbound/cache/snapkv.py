"""``snapkv``: SnapKV (Li et al. 2024) -- an observation window votes for the tokens to keep.

The queries of the newest ``window`` tokens vote: each older token's score is the attention
they give it, summed over the window's queries and over the query heads of each KV head's group,
then smoothed by 1-D max pooling (``kernel``, 1 = off) along the held tokens. Each KV head keeps
the window's own tokens plus its top-scoring older tokens. If ``budget <= window`` only the
newest ``budget`` tokens fit and SnapKV keeps exactly what ``window`` would.

Prefill (as in the paper): the prompt's last ``window`` queries vote with their attention over
the prompt (softmax over every key they see, causal) and the prompt is compressed once. A prompt
fed in chunks is compressed after each chunk: the chunk's last ``window`` queries vote over the
held keys plus the chunk (a final chunk shorter than ``window`` also counts the previous chunk's
newest queries, with the votes they cast at their own step).

Decoding (the paper compresses only the prompt; here the budget holds during decoding too):
whenever a step overflows the budget the same rule runs with the newest ``window`` queries, and
**each query's vote is its own attention at its own step**: the probabilities it gave the keys
the layer returned to attention at that step (its softmax ran over exactly those keys), never
recomputed. A key evicted since takes its votes with it; a key that arrived after a query has
no vote from that query (causal). The layer keeps these rows (the ``votes`` tier,
``[B, kv_heads, <= window, held]`` float32, columns aligned with the held keys): a step appends
its own rows (zeros for the older rows under its new keys) and drops the oldest, and an eviction
gathers the columns together with the K/V. Before this, every overflowing step re-scored the
stored window queries against the keys held now (a softmax over a different set of keys per
step); that cost a second attention pass per layer and step. With kvbound's tiered attention
the step's rows are the model's own attention probabilities; for a model on another attention
implementation the layer computes them from the parked query (the same values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import KVBoundError
from .base import nbytes
from .checks import check_int
from .evicting import EvictingCache, EvictingLayer, ScoredOptions, attention_mass, pool_votes
from .registry import register


@dataclass
class SnapKVOptions(ScoredOptions):
    window: int = 32  # observation window: newest queries that vote (and tokens always kept)
    kernel: int = 7  # max-pooling kernel over the votes (odd; 1 disables pooling)


def snapkv_scores(votes: torch.Tensor, protect: int, kernel: int) -> torch.Tensor:
    """Pooled votes for the older tokens, +inf for the ``protect`` newest (the window)."""
    n = votes.shape[-1]
    pooled = pool_votes(votes[..., :n - protect], kernel)
    return torch.cat([pooled, torch.full_like(votes[..., n - protect:], float("inf"))], dim=-1)


class SnapKVLayer(EvictingLayer):
    token_state = {"votes": 2}
    per_query_mass = True

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        # [B, kv_heads, held, <= window]: the newest queries' own attention, rows aligned with the held keys
        # (tokens on dim 2, like the K/V, so ragged heads pack them without a transpose)
        self.votes: torch.Tensor | None = None

    def query_rows(self, new: int) -> int:
        return min(self.cache.options.window, new)

    def policy_tiers(self) -> dict[str, int]:
        return {"votes": nbytes(self.votes)}

    def reset_policy(self) -> None:
        self.votes = None

    def select(self, keys, positions, query, query_pos, mass=None):
        window = self.cache.options.window
        if mass is None:  # no tiered attention: the step's rows are scored here
            mass = attention_mass(query, query_pos, keys, positions, self.scaling(), self.cache.softcap,
                                  per_query=True)
        mass = mass[..., -window:, :].transpose(-1, -2)  # [B, kv_heads, n, rows]; cake may ask for more rows
        ring, n = mass, keys.shape[-2]
        keep_old = window - mass.shape[-1]
        if self.votes is not None and keep_old > 0:
            old = self.votes[..., -keep_old:]  # the step's new keys come after these queries: no votes
            ring = torch.cat([F.pad(old, (0, 0, 0, n - old.shape[-2])), mass], dim=-1)
        self.votes = ring.contiguous()  # the base gathers the kept rows
        protect = min(window, self.capacity)
        return self.keep(snapkv_scores(self.votes.sum(dim=-1), protect, self.cache.options.kernel), protect_last=protect)


@register("snapkv", "lossy: SnapKV (Li et al. 2024) -- the last `window` queries vote (max-pooled) for tokens to keep",
          exact=False, options=SnapKVOptions, beams=True, paper="Li et al. 2024, https://arxiv.org/abs/2404.14469")
class SnapKVCache(EvictingCache):
    layer_cls = SnapKVLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        check_int(opts.window, "window", "snapkv", 1)
        check_int(opts.kernel, "kernel", "snapkv", 1)
        if opts.kernel % 2 == 0:
            raise KVBoundError(f"snapkv option kernel must be odd (same-length pooling), got {opts.kernel}")
        super().__init__(model, budget, opts)

    def protected_tokens(self) -> int:
        return self.options.window
