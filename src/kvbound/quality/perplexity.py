"""Perplexity of a long text, scored through a kvbound cache.

Each token's next-token distribution comes from what the policy holds at that point plus the
current chunk: the text is fed ``chunk`` tokens per forward pass into ``cache`` (as a bounded cache
really runs), every position's logits are kept, and the negative log-likelihood of the token that
follows is averaged. ``perplexity = exp(mean_nll)``.

``chunk`` and what it means:

* ``chunk=1`` is strict token-by-token scoring: token ``t`` is predicted from the K/V the policy
  holds after ``t-1`` steps plus token ``t-1`` itself (a lossy policy at budget ``B`` sees at most
  ``B + 1`` keys), exactly as in greedy decoding.
* ``chunk=C > 1`` (the default :data:`DEFAULT_CHUNK` = 16) is C times fewer forward passes: inside a
  chunk, position ``j`` also attends to the chunk's earlier ``j`` tokens, so a lossy policy at budget
  ``B`` scores with ``B .. B + C - 1`` past keys, never fewer than strict scoring. Its perplexity is
  therefore a little *better* than strict; for budgets much larger than ``C`` the difference is small.
  Exact policies (``full``, ``kv-direct``, ``residual``, ``offload``) give the same numbers for any
  chunk (up to float rounding); ``kv-direct`` rebuilds its evicted span once per chunk, so its cost
  falls roughly as ``1/C``.

No batch, no padding: one sequence ``[1, T]``; ``T - 1`` tokens are scored.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..errors import KVBoundError
from ..generation import check_chunk, max_positions
from ..rss import peak_rss_bytes, reset_peak_rss

DEFAULT_CHUNK = 16


@dataclass(frozen=True)
class PerplexityResult:
    """What :func:`perplexity` measured. ``tokens`` = tokens scored (the text's length minus one)."""

    perplexity: float
    tokens: int
    mean_nll: float
    seconds: float
    peak_rss_bytes: int
    chunk: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_ids(input_ids: Any) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise KVBoundError(f"perplexity scores one sequence: input_ids must be [T] or [1, T], got {tuple(ids.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise KVBoundError(f"input_ids must be integer token ids, got {ids.dtype}")
    return ids.long()


@torch.no_grad()
def perplexity(model, input_ids: Any, cache, chunk: int = DEFAULT_CHUNK,
               progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``input_ids`` (``[T]`` or ``[1, T]``) under ``model`` with the K/V ``cache`` holds.

    ``cache`` must be fresh (a :func:`kvbound.make_cache` result, or any transformers ``Cache``).
    ``progress`` is called with the number of tokens fed after each chunk. ``peak_rss_bytes`` is the
    process's high-water mark during the call (reset at the start where the OS allows it; model
    weights included). Raises :class:`KVBoundError` for fewer than 2 tokens, a text longer than the
    model's positions, a bad ``chunk`` or a cache that has already seen tokens.
    """
    check_chunk(chunk if chunk is not None else 0)  # None (one pass) is not a scoring mode
    ids = _as_ids(input_ids)
    total = ids.shape[1]
    if total < 2:
        raise KVBoundError(f"perplexity needs at least 2 tokens (one to predict from, one to predict), got {total}")
    limit = max_positions(model)
    if limit is not None and total > limit:
        raise KVBoundError(f"the text is {total} tokens but the model handles at most {limit} positions; "
                           f"score at most {limit} tokens")
    if cache.get_seq_length() != 0:
        raise KVBoundError(f"perplexity needs a fresh cache; this one has already seen {cache.get_seq_length()} tokens")
    device = next(model.parameters()).device
    ids = ids.to(device)
    reset_peak_rss()
    start = time.perf_counter()
    nll_sum = torch.zeros((), dtype=torch.float64)
    fed = total - 1  # the last token is only ever a target
    for pos in range(0, fed, chunk):
        end = min(pos + chunk, fed)
        out = model(input_ids=ids[:, pos:end], attention_mask=torch.ones_like(ids[:, :end]),
                    past_key_values=cache, use_cache=True)
        logits = out.logits[0].float()
        targets = ids[0, pos + 1:end + 1]
        nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double().cpu()
        del out, logits
        if progress is not None:
            progress(end)
    seconds = time.perf_counter() - start
    mean_nll = float(nll_sum) / fed
    return PerplexityResult(perplexity=math.exp(mean_nll), tokens=fed, mean_nll=mean_nll, seconds=seconds,
                            peak_rss_bytes=peak_rss_bytes(), chunk=chunk)
