"""``knorm``: keep the keys of smallest L2 norm (Devoto, Zhao, Scardapane, Minervini 2024).

"A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
https://arxiv.org/abs/2406.11430: keys of low norm draw high attention, so each KV head keeps
the ``budget`` tokens whose keys have the smallest norm, ``score_i = -||k_i||``. The score needs
no query and no attention weights (only the held keys), so it runs with any attention
implementation, and a RoPE rotation does not change it. It is computed on every step that
overflows the budget, in prefill chunks and while decoding; a token's score never changes, so
re-computing it from the held keys equals keeping it.

Differences from the paper's code: kvbound's budget binds every layer, so layers 0-1 (which the
reference code leaves uncompressed) are compressed too, as in kvpress's ``KnormPress``. Option
``window`` (default 0, as the paper) always keeps the newest tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .checks import check_int
from .evicting import EvictingCache, EvictingLayer, ScoredOptions
from .registry import register


@dataclass
class KnormOptions(ScoredOptions):
    window: int = 0  # newest tokens always kept (the paper keeps none)


def knorm_scores(keys: torch.Tensor) -> torch.Tensor:
    """``-||k_i||`` per KV head: ``keys`` ``[B, kv_heads, n, D]`` -> ``[B, kv_heads, n]`` float32."""
    return -keys.float().norm(dim=-1)


class KnormLayer(EvictingLayer):
    def select(self, keys, positions, query, query_pos, mass=None):
        if keys.shape[-2] <= self.capacity:
            return None
        return self.keep(knorm_scores(keys), protect_last=self.cache.options.window)


def check_window(opts: Any, budget: int, policy: str) -> None:
    """``window`` (newest tokens always kept) is a whole number in ``[0, budget]``."""
    check_int(opts.window, "window", policy, 0)
    if opts.window > budget:
        raise KVBoundError(f"{policy} option window must be <= budget ({budget}), got {opts.window}")


@register("knorm", "lossy: Knorm (Devoto et al. 2024) -- keeps the keys of smallest L2 norm; needs no query",
          exact=False, options=KnormOptions, beams=True,
          paper="Devoto, Zhao, Scardapane, Minervini 2024, https://arxiv.org/abs/2406.11430")
class KnormCache(EvictingCache):
    layer_cls = KnormLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        check_window(opts, budget, "knorm")
        super().__init__(model, budget, opts)
