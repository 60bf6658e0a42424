"""How many tokens each (layer, KV head) keeps: the ``allocation`` option of every scored policy.

``budget`` keeps one meaning for every allocation: the mean number of tokens held per (layer, KV
head) of the full-attention layers, so every allocation holds the same bytes as ``uniform`` at the
same budget (Gemma 3's sliding layers keep their recent suffix, outside the allocation).

* ``uniform`` -- every head of every layer keeps ``budget`` tokens (the top of its own scores).
* ``pyramid`` -- PyramidKV (Cai et al. 2024, https://arxiv.org/abs/2406.02069): a linear schedule
  over depth, ``max - l (max - min) / (L - 1)`` with ``min = budget / beta`` and
  ``max = 2 budget - min`` (capped at ``n - window`` while the context is short); heads uniform.
* ``ada`` -- Ada-KV (Feng et al. 2024, https://arxiv.org/abs/2407.11550): the layer's
  ``heads x capacity`` highest scores over all its KV heads together decide how many tokens each head
  gets (``n_h``); with the floor ``alpha`` head ``h`` keeps ``(1 - alpha) n_h + alpha capacity`` of
  its own top tokens. Heads become ragged: each holds its own number of tokens
  (:mod:`kvbound.cache.evicting` stores them without padding).
* ``cake`` -- CAKE (Qin et al. 2025, https://arxiv.org/abs/2503.12491): each layer's share of the
  total from the dispersion of its attention during prefill, ``P_l = H_l^(1/tau1) V_l^(1/tau2)``
  (entropy and variance of the last ``cake_window`` queries' attention), recomputed after each
  layer over the layers seen so far (cascading: earlier layers shrink to their new share at once);
  heads uniform. CAKE's own eviction indicator is not used: the policy's scores rank the tokens.
* ``global`` -- KVzip's default (Kim et al. 2025, https://arxiv.org/abs/2505.23416): one ranking of
  the scores of every (full-attention layer, KV head, token) together; the top ``layers x heads x
  budget`` stay, so layers and heads get what their scores earn (:func:`global_counts`). Only for a
  policy whose scores compare across layers (``kvzip``: attention probabilities in [0, 1] from the
  same reconstruction), and only where every layer's scores exist at once (after its reconstruction).

:func:`choose` is the one function that turns a policy's scores into the kept tokens of a layer;
:func:`global_counts` spreads a total over several layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import KVBoundError
from .codec import CodecOptions

ALLOCATIONS = ("uniform", "pyramid", "ada", "cake")
PAPERS = {
    "pyramid": "Cai et al. 2024, https://arxiv.org/abs/2406.02069",
    "ada": "Feng et al. 2024, https://arxiv.org/abs/2407.11550",
    "cake": "Qin et al. 2025, https://arxiv.org/abs/2503.12491",
    "global": "Kim et al. 2025, https://arxiv.org/abs/2505.23416",
}
ACROSS_LAYERS = ("global",)  # allocations that rank every layer's scores together (policies opt in)


@dataclass
class AllocationOptions(CodecOptions):
    """Options every scored policy takes (besides its own): how the budget is spread."""

    allocation: str = "uniform"  # uniform | pyramid | ada | cake (| global: kvzip)
    pyramid_beta: float = 20.0  # PyramidKV: the top layer keeps budget / beta
    ada_floor: float = 0.2  # Ada-KV: share of each head's capacity it keeps whatever the other heads score
    cake_window: int = 32  # CAKE: newest queries whose attention dispersion sets the layer shares
    cake_tau1: float = 1.0  # CAKE: temperature of the entropy
    cake_tau2: float = 1.0  # CAKE: temperature of the variance


def check_allocation(opts: AllocationOptions, budget: int, policy: str, extra: tuple[str, ...] = ()) -> None:
    """One-line errors for an unknown allocation, bad parameters, or a budget below the floors
    (``pyramid``'s top layer keeps ``budget / beta >= 1`` tokens, ``ada``'s floor at least one).
    ``extra``: the allocations of :data:`ACROSS_LAYERS` the policy supports.
    A layer whose capacity falls below a policy's always-kept tokens (window, recent) keeps the
    newest ``capacity`` of them."""
    if opts.allocation in ACROSS_LAYERS and opts.allocation not in extra:
        raise KVBoundError(f"{policy} option allocation={opts.allocation} ranks the scores of every layer together, "
                           f"which only kvzip's reconstruction scores allow; use one of {', '.join(ALLOCATIONS)}")
    if opts.allocation not in (*ALLOCATIONS, *extra):
        raise KVBoundError(f"{policy} option allocation must be one of {', '.join((*ALLOCATIONS, *extra))}, "
                           f"got {opts.allocation!r}")
    for name, lo in (("pyramid_beta", 1.0), ("cake_tau1", 0.0), ("cake_tau2", 0.0)):
        value = getattr(opts, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > lo - (name == "pyramid_beta"):
            raise KVBoundError(f"{policy} option {name} must be a number {'>= 1' if lo else '> 0'}, got {value!r}")
    if isinstance(opts.ada_floor, bool) or not isinstance(opts.ada_floor, (int, float)) or not 0 <= opts.ada_floor <= 1:
        raise KVBoundError(f"{policy} option ada_floor must be a number in [0, 1], got {opts.ada_floor!r}")
    if isinstance(opts.cake_window, bool) or not isinstance(opts.cake_window, int) or opts.cake_window < 1:
        raise KVBoundError(f"{policy} option cake_window must be a whole number >= 1, got {opts.cake_window!r}")
    if opts.allocation == "pyramid" and budget < opts.pyramid_beta:
        raise KVBoundError(f"{policy} allocation=pyramid: the top layer keeps budget/pyramid_beta = "
                           f"{budget / opts.pyramid_beta:g} tokens, below the floor of 1; raise budget to "
                           f">= {math.ceil(opts.pyramid_beta)} or lower pyramid_beta")
    if opts.allocation == "ada" and math.floor(opts.ada_floor * budget) < 1 and opts.ada_floor > 0:
        raise KVBoundError(f"{policy} allocation=ada: the per-head floor ada_floor x budget = "
                           f"{opts.ada_floor * budget:g} tokens is below 1; raise budget to "
                           f">= {math.ceil(1 / opts.ada_floor)} or set ada_floor=0")


# --------------------------------------------------------------------------- layer capacities


def pyramid_capacities(budget: int, layers: int, beta: float, n: int | None = None, window: int = 0) -> list[int]:
    """PyramidKV's per-layer capacities (bottom layer first), summing to ``layers * budget``.

    ``n`` (tokens seen) caps the bottom layer at ``n - window`` while the context is short, as the
    paper does; the integer remainder goes to the largest fractions."""
    if layers <= 1:
        return [budget] * layers
    lo = budget / beta
    hi = 2 * budget - lo
    if n is not None and hi > n - window and n - window >= budget:
        hi = n - window
        lo = 2 * budget - hi
    caps = [hi - i * (hi - lo) / (layers - 1) for i in range(layers)]
    out = [int(c) for c in caps]
    by_fraction = sorted(range(layers), key=lambda i: caps[i] - out[i], reverse=True)
    for i in range(layers * budget - sum(out)):
        out[by_fraction[i % layers]] += 1
    return out


def cake_preference(probs: torch.Tensor, tau1: float, tau2: float) -> float:
    """CAKE's layer preference from the attention ``probs`` ``[B, heads, w, n]`` (float32) of the
    window's queries: entropy ``H = -sum A log A`` and variance ``V = sum_j Var_i A_ij``, both
    summed over heads (and the batch); ``P = H^(1/tau1) V^(1/tau2)``."""
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    variance = probs.var(dim=-2, unbiased=False).sum() if probs.shape[-2] > 1 else probs.new_zeros(())
    return float(entropy.clamp_min(0) ** (1 / tau1) * variance.clamp_min(0) ** (1 / tau2))


def cake_capacities(prefs: list[float], budget: int, floor: int, limit: int | None = None) -> list[int]:
    """Each layer's capacity: ``floor`` plus its preference share of ``len(prefs) * (budget - floor)``,
    at most ``limit`` (tokens seen); what the cap cuts is redistributed over the other layers."""
    count = len(prefs)
    pool = count * (budget - floor)
    cap = None if limit is None else max(0, limit - floor)
    weights = [max(p, 0.0) for p in prefs]
    if sum(weights) <= 0 or not all(math.isfinite(w) for w in weights):
        weights = [1.0] * count
    share = [0.0] * count
    free = list(range(count))
    left = float(pool)
    while free and left > 1e-9:
        total = sum(weights[i] for i in free) or float(len(free))
        over = []
        for i in free:
            share[i] += left * ((weights[i] / total) if total else 1 / len(free))
        left = 0.0
        for i in free:
            if cap is not None and share[i] > cap:
                left += share[i] - cap
                share[i] = cap
                over.append(i)
        free = [i for i in free if i not in over]
    out = [int(s) for s in share]
    rest = pool - sum(out) - (int(left) if not free else 0)
    order = sorted(range(count), key=lambda i: share[i] - out[i], reverse=True)
    for i in order:
        if rest <= 0:
            break
        if cap is None or out[i] < cap:
            out[i] += 1
            rest -= 1
    return [floor + o for o in out]


# --------------------------------------------------------------------------- selection


@dataclass
class Kept:
    """A ragged selection: ``mask`` ``[B, H, n]`` (True = keep) with ``counts`` ``[B, H]`` tokens per head."""

    mask: torch.Tensor
    counts: torch.Tensor


def head_counts(scores: torch.Tensor, capacity: int, floor: float) -> torch.Tensor:
    """Ada-KV's tokens per head ``[B, H]``: ``n_h`` of the layer's top ``H * capacity`` scores fall in
    head ``h``; it keeps ``(1 - floor) n_h + floor * capacity`` (rounded so the heads sum to
    ``H * capacity``), at most the tokens it holds (finite or ``+inf`` scores)."""
    b, h, n = scores.shape
    held = (scores > float("-inf")).sum(-1)  # [B, H]
    total = torch.clamp(held.sum(-1), max=h * capacity)  # [B]
    flat = scores.reshape(b, h * n)
    k = min(h * capacity, h * n)
    n_h = torch.zeros(b, h, dtype=torch.float64, device=scores.device)
    if 2 * k <= h * n:  # few kept: the top k, counted per head while their rank is within the total
        top = flat.topk(k, dim=-1)
        rank_ok = torch.arange(k, device=scores.device)[None, :] < total[:, None]
        n_h.scatter_add_(1, top.indices // n, rank_ok.to(torch.float64))
    else:  # few dropped (a decoding step): the bottom h*n - k, the padding (-inf) among them
        drop = h * n - k
        n_h += n
        if drop:
            bottom = flat.topk(drop, dim=-1, largest=False)
            n_h.scatter_add_(1, bottom.indices // n, torch.full((b, drop), -1.0, dtype=torch.float64,
                                                                   device=scores.device))
        short = (k - total).clamp(min=0)  # fewer held than k: the lowest of the rest go too (padding)
        if bool((short > 0).any()):
            n_h = torch.minimum(n_h, held.to(torch.float64))
    want = (1 - floor) * n_h + floor * total.to(torch.float64)[:, None] / h
    counts = torch.minimum(want.floor().long(), held)
    # hand out the rounding remainder (at most h - 1), largest fraction first, to heads that still hold more
    rest = total - counts.sum(-1)
    if bool((rest > 0).any()):
        frac = (want - want.floor()).masked_fill(counts >= held, -1.0)
        order = frac.argsort(dim=-1, descending=True, stable=True)
        place = torch.empty_like(order).scatter_(-1, order, torch.arange(h, device=scores.device).expand_as(order))
        counts += ((place < rest[:, None]) & (frac > -1.0)).long()
        rest = total - counts.sum(-1)
        if bool((rest > 0).any()):  # heads at their cap: the others take what is left, in order
            room = held - counts
            for j in range(h):
                take = torch.minimum(room[:, j], rest.clamp_min(0))
                counts[:, j] += take
                rest = rest - take
    return counts


def choose(scores: torch.Tensor, capacity: int, allocation: str = "uniform", floor: float = 0.0,
           valid: torch.Tensor | None = None, protect_last: int = 0) -> torch.Tensor | Kept | None:
    """The tokens a layer keeps, from a policy's ``scores`` ``[B, kv_heads or 1, n]`` (higher = keep,
    ``+inf`` always kept, NaN never). ``capacity`` is the layer's mean tokens per head; ``valid``
    ``[B, H, n]`` marks the entries a ragged head really holds (the rest is the step's padding); the
    last ``protect_last`` entries (the newest tokens) are always kept.

    Returns ``None`` (keep everything: the layer holds at most ``capacity`` per head, or for ``ada``
    at most ``heads x capacity`` in all), ascending indices ``[B, H or 1, k]`` when every head keeps the
    same number (``uniform`` / ``pyramid`` / ``cake``, the fast rectangular path), or :class:`Kept`.
    """
    scores = scores.nan_to_num(nan=float("-inf"))
    if protect_last:
        scores = scores.clone()
        scores[..., scores.shape[-1] - protect_last:] = float("inf")
    if valid is not None:
        scores = scores.expand(valid.shape).masked_fill(~valid, float("-inf"))
    b, h, n = scores.shape
    if allocation != "ada":
        if valid is None:
            if n <= capacity:
                return None
            return scores.topk(capacity, dim=-1).indices.sort(dim=-1).values
        held = valid.sum(-1)
        if bool((held <= capacity).all()):
            return None
        counts = held.clamp(max=capacity)
    else:
        held = valid.sum(-1) if valid is not None else torch.full((b, h), n, device=scores.device)
        if bool((held.sum(-1) <= h * capacity).all()) and (valid is not None or n <= capacity):
            return None
        scores = scores.expand(b, h, n) if scores.shape[1] != h else scores
        counts = head_counts(scores, capacity, floor)
    return keep_counts(scores.expand(b, counts.shape[1], n), counts)


def global_counts(ranks: list[torch.Tensor], total: int) -> list[torch.Tensor]:
    """How many tokens each head of each layer keeps when the top ``total`` entries of all the
    ``ranks`` (one ``[B, H, n_l]`` per layer; higher = keep, ``+inf`` always, ``-inf`` never: padding)
    are chosen together. Returns one ``[B, H]`` count tensor per layer, summing to ``min(total, the
    entries that are not -inf)`` per sequence."""
    b, h = ranks[0].shape[:2]
    device = ranks[0].device
    flat = torch.cat([r.reshape(b, -1) for r in ranks], dim=-1)
    owner = torch.cat([torch.arange(i * h, (i + 1) * h, device=device).repeat_interleave(r.shape[-1])
                       for i, r in enumerate(ranks)])  # the (layer, head) of each column
    top = flat.topk(min(total, flat.shape[-1]), dim=-1)
    counts = torch.zeros(b, len(ranks) * h, dtype=torch.long, device=device)
    counts.scatter_add_(1, owner[top.indices], (top.values > float("-inf")).long())
    return list(counts.split(h, dim=1))


def keep_counts(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | Kept:
    """Each head's top ``counts`` ``[B, H]`` entries of ``scores`` ``[B, H, n]``: ascending indices
    ``[B, H, k]`` when all counts are equal, else :class:`Kept`."""
    n = scores.shape[-1]
    order = scores.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n, device=scores.device).expand_as(order))
    mask = rank < counts.unsqueeze(-1)
    if bool((counts == counts[0, 0]).all()):
        k = int(counts[0, 0])
        return (~mask).to(torch.int8).argsort(dim=-1, stable=True)[..., :k]
    return Kept(mask, counts)
