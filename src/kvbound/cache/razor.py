"""``razor``: RazorAttention (Tang et al. 2024, https://arxiv.org/abs/2407.15891) -- retrieval heads
keep the context, the other heads keep sinks, recent tokens and one compensation token.

The retrieval heads are found once per model without training
(:mod:`kvbound.cache.retrieval_heads`: echo and induction scores on a repeated random sequence,
GQA maximum over the group): ``fraction`` of the KV heads of the full-attention layers, the top
echo heads (1/15 of them) then the top induction heads.

``budget`` means what it means for every policy: the mean tokens per (full-attention layer, KV
head), so razor holds the same bytes as ``uniform`` at the same budget. At every step, with ``n``
tokens seen:

* a retrieval head keeps the whole context while the budget allows it (``min(n, cap_r)`` tokens;
  beyond that the ``sinks`` first and the newest);
* every other head keeps the ``sinks`` first tokens, the ``recent`` newest, and -- with
  ``compensation`` -- one token standing for everything it dropped: the mean of their keys and
  values (weighted by how many tokens each merged entry already stood for) with ``log m`` added to
  its logit, ``m`` the tokens it stands for (the paper's compensation token). ``recent`` defaults
  to what the budget leaves once the retrieval heads hold the context; a given ``recent`` is fixed
  and the retrieval heads get the rest.

Heads are ragged (:mod:`kvbound.cache.evicting`): a head that keeps 10 tokens holds 10 tokens.
Everything lives in the hot tier (also through ``codec``: the compensation token is re-encoded
each time it changes). What is exact: a retrieval head's attention equals the full cache's while
it holds the whole context (``n <= cap_r``; with ``codec`` up to the codec's rounding); the other
heads are approximations. Keeping a retrieval head's old tokens in ``offload``'s store is not
supported (razor keeps them hot). ``compress`` (kvpress's protocol, ``kvbound bench --scenario
ruler``) holds a recorded context as after one step of razor over it, then holds what follows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .allocation import keep_counts
from .base import nbytes
from .checks import check_int
from .codec import CodecOptions, decode_kv, encode_kv
from .evicting import BIG_POSITION, EvictingCache, EvictingLayer
from .registry import register
from .retrieval_heads import ensure_scores, load_scores, pick


@dataclass
class RazorOptions(CodecOptions):
    fraction: float = 0.15  # share of the full-attention layers' KV heads that are retrieval heads
    sinks: int = 4  # first tokens every head keeps
    recent: int | None = None  # newest tokens the other heads keep; default: what the budget leaves
    compensation: bool = True  # the other heads merge what they drop into one weighted token
    threshold: float = 2.0  # a retrieval head's echo or induction score must exceed threshold x chance


class RazorLayer(EvictingLayer):
    token_state = {"weight": 2}  # tokens each held entry stands for (1; m for a compensation token)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.weight: torch.Tensor | None = None  # [B, H, held] float32

    def query_rows(self, new: int) -> int:
        return 0 if self.is_sliding else 1  # select after attention: the merge rewrites the step's K/V

    def policy_tiers(self) -> dict[str, int]:
        return {"weights": nbytes(self.weight)}

    def reset_policy(self) -> None:
        self.weight = None

    def step_bias(self, valid: torch.Tensor | None, new: int) -> torch.Tensor | None:
        """``log`` of each key's weight: 0 for a token, ``log m`` for a compensation token, ``-inf``
        on padding (its weight is 0). Called by ``update`` before attention and ``select``."""
        b, h, past = self.positions.shape  # the held (padded) entries; the step's come after
        held = self.weight if self.weight is not None and self.weight.shape[-1] == past else \
            torch.ones(b, h, past, device=self.positions.device)
        if valid is not None:
            held = held * valid[..., :past]
        self._step_weights = torch.cat([held, torch.ones(b, h, new, device=held.device)], dim=-1)
        if valid is None and bool((held == 1).all()):
            return None
        return torch.log(self._step_weights)

    def select(self, keys, positions, query, query_pos, mass=None):
        opts = self.cache.options
        b, h, n = positions.shape
        valid = self._valid if self._valid is not None else torch.ones(b, h, n, dtype=torch.bool)
        weights = self._step_weights
        cap_r, recent = self.cache.head_capacities(self.seen)
        retrieval = self.cache.retrieval[self.layer_idx]  # [H] bool
        comp = 1 if opts.compensation else 0
        held = valid.sum(-1)  # [B, H]
        want = torch.where(retrieval, torch.tensor(cap_r), torch.tensor(opts.sinks + recent)).expand(b, h)
        want = want - comp * (retrieval & (held > want))  # a retrieval head that drops: its merged token counts
        plain = torch.minimum(held, want)
        if bool((held <= plain).all()):
            self.weight = weights
            return None
        pos = positions.masked_fill(~valid, -1).float()
        scores = pos.masked_fill(valid & (positions < opts.sinks), float("inf")).masked_fill(~valid, float("-inf"))
        kept = keep_counts(scores, plain)
        mask = kept.mask if not isinstance(kept, torch.Tensor) else torch.zeros_like(valid).scatter_(-1, kept, True)
        dropped = valid & ~mask
        counts = plain
        if comp and bool(dropped.any()):
            mask, counts, weights = self._compensate(keys, positions, dropped, mask, weights, plain)
        self.weight = weights
        return keep_counts(mask.float().masked_fill(~mask, float("-inf")), counts)

    def compress(self, keys: torch.Tensor, values: torch.Tensor, keep: int, query: torch.Tensor | None = None,
                 mass: torch.Tensor | None = None, seen: int | None = None) -> None:
        """Hold the recorded context as after one ``n``-token step of razor (kvpress's protocol): the
        retrieval heads their share, the others sinks + recent + the compensation token; then hold
        everything that follows. Needs no query: razor selects by position."""
        if self.is_sliding:
            return super().compress(keys, values, keep, query, mass, seen)
        # the compensation merge writes into the held K/V: never into the recorder's shared tensors
        positions, stored = self._start_context(keys, values, seen, copy=True)
        self.keys, self.values, self.positions = stored[0], stored[1], positions
        self._step_weights = torch.ones(positions.shape, device=keys.device)
        self._keep(stored, positions, self.select(keys, positions, None, positions[0, 0, :0]))
        self.capacity = self.UNBOUNDED

    def _keep(self, stored, positions, idx, valid=None) -> None:
        if self.compressed:  # nothing is selected after compress: the step's tokens weigh 1, the merged token m
            self.weight = self._step_weights
        super()._keep(stored, positions, idx, valid)

    def _compensate(self, keys, positions, dropped, mask, weights, counts):
        """Merge each head's dropped entries into one entry (the newest dropped slot): the weighted
        mean of their K/V, weight = the tokens they stand for. Rewrites the step's K/V (attention
        has already run)."""
        has = dropped.any(-1)  # [B, H]
        slot = positions.masked_fill(~dropped, -1).argmax(-1)  # [B, H] newest dropped entry
        w = weights * dropped  # [B, H, n]
        total = w.sum(-1).clamp_min(1e-30)
        codec = self.cache.codec
        kf, vf = decode_kv(codec, self.keys, self.values, keys.dtype)
        k_mean = (w.unsqueeze(-1) * kf.float()).sum(-2) / total.unsqueeze(-1)  # [B, H, D]
        v_mean = (w.unsqueeze(-1) * vf.float()).sum(-2) / total.unsqueeze(-1)
        enc_k, enc_v = encode_kv(codec, k_mean.unsqueeze(-2).to(keys.dtype), v_mean.unsqueeze(-2).to(keys.dtype))
        at = slot.view(*slot.shape, 1, 1)
        for held, row in ((self.keys, enc_k), (self.values, enc_v)):
            old = held.gather(2, at.expand(-1, -1, 1, held.shape[-1]))
            held.scatter_(2, at.expand(-1, -1, 1, held.shape[-1]), torch.where(has.view(*has.shape, 1, 1), row, old))
        weights = weights.scatter(-1, slot.unsqueeze(-1), torch.where(has, total, weights.gather(-1, slot.unsqueeze(-1))
                                                                      .squeeze(-1)).unsqueeze(-1))
        mask = mask | (torch.zeros_like(mask).scatter_(-1, slot.unsqueeze(-1), True) & has.unsqueeze(-1))
        return mask, counts + has.long(), weights


@register("razor", "lossy: RazorAttention (Tang et al. 2024) -- retrieval heads keep the context, the others sinks + "
          "recent + a compensation token", exact=False, options=RazorOptions, beams=True,
          paper="Tang et al. 2024, https://arxiv.org/abs/2407.15891")
class RazorCache(EvictingCache):
    layer_cls = RazorLayer
    ragged_heads = True

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        if isinstance(opts.fraction, bool) or not isinstance(opts.fraction, (int, float)) or not 0 <= opts.fraction <= 1:
            raise KVBoundError(f"razor option fraction must be a number in [0, 1], got {opts.fraction!r}")
        if isinstance(opts.threshold, bool) or not isinstance(opts.threshold, (int, float)) or opts.threshold < 0:
            raise KVBoundError(f"razor option threshold must be a number >= 0, got {opts.threshold!r}")
        check_int(opts.sinks, "sinks", "razor", 0)
        if opts.recent is not None:
            check_int(opts.recent, "recent", "razor", 1)
        if not isinstance(opts.compensation, bool):
            raise KVBoundError(f"razor option compensation must be true or false, got {opts.compensation!r}")
        super().__init__(model, budget, opts)
        scores = load_scores(model)
        heads = len(self.full_layers) * self.kv_heads
        count = round(opts.fraction * heads)
        chosen, qualified = pick(scores, count, opts.threshold)
        if len(chosen) < count:
            raise KVBoundError(f"razor: the calibration found {qualified} retrieval head(s) (echo or induction score "
                               f"above {opts.threshold:g}x chance) on this model, {count} wanted at fraction "
                               f"{opts.fraction:g}; lower fraction (<= {qualified / heads:.3f}) or threshold")
        self.retrieval = {i: torch.zeros(self.kv_heads, dtype=torch.bool) for i in range(len(self.layers))}
        for layer, head in chosen:
            self.retrieval[layer][head] = True
        self.n_retrieval, self.n_other = len(chosen), heads - len(chosen)
        self.head_capacities(budget)  # budget below the floors: one line now, not mid-generation

    @classmethod
    def prepare(cls, model) -> bool:
        return ensure_scores(model)[1]  # the head map: measured once per model (a calibration pass), then read

    def compress(self, context, keep: int) -> None:
        """kvpress's protocol at ``keep`` = this cache's budget (the mean tokens per KV head): each
        layer as after one step over the whole context (:meth:`RazorLayer.compress`)."""
        if keep != self.budget:
            raise KVBoundError(f"razor compresses to its budget ({self.budget} tokens per KV head), got keep {keep}")
        super().compress(context, keep)

    def finish_compress(self) -> None:
        weights = [layer.weight for layer in self.layers]  # the compensation tokens' log m stays in every step
        super().finish_compress()
        for layer, weight in zip(self.layers, weights):
            layer.weight = weight

    def head_capacities(self, seen: int) -> tuple[int, int]:
        """``(cap_r, recent)`` after ``seen`` tokens: a retrieval head's tokens and the other heads'
        recent window, the total at most ``heads x budget``."""
        opts = self.options
        total = (self.n_retrieval + self.n_other) * self.budget
        base = opts.sinks + (1 if opts.compensation else 0)
        r, o = self.n_retrieval, self.n_other
        if opts.recent is not None:
            recent = opts.recent
            cap_r = (total - o * (base + recent)) // r if r else 0
        else:
            cap_r = min(seen, (total - o * (base + 1)) // r) if r else 0
            recent = (total - r * cap_r) // o - base if o else 0
        if (r and cap_r < base + 1) or (o and recent < 1):
            raise KVBoundError(f"razor: budget {self.budget} is below the floors: {o} other head(s) need "
                               f"sinks + compensation + recent = {base + (opts.recent or 1)} tokens and {r} retrieval "
                               f"head(s) at least {base + 1}; raise budget or lower sinks/recent")
        return cap_r, recent

    def memory_report(self) -> dict[str, Any]:
        report = super().memory_report()
        report["allocation"] = "razor"
        report["retrieval_heads"] = [[int(h) for h in self.retrieval[i].nonzero().flatten()] for i in range(len(self.layers))]
        return report
