"""``expected-attention``: the attention future queries are expected to give (Devoto, Jeblick, Jégou 2025).

"Expected Attention: KV Cache Compression by Estimating Attention from Future Queries
Distribution", https://arxiv.org/abs/2510.00636 (reference code: NVIDIA kvpress,
``ExpectedAttentionPress``). Per layer and query head, the future queries are modelled as a
Gaussian fitted to recent queries, and each key is scored by its expected attention in closed form:

1. the attention inputs (normed hidden states) of recent tokens, minus the first ``sinks``
   tokens, give pre-RoPE queries (``q_proj``, then ``q_norm`` for Qwen3/Gemma 3); their mean
   ``mu`` and covariance ``S`` are taken in float32;
2. RoPE averaged over the next ``n_future`` positions, ``R = mean_p R_p``, is built with the
   model's own rotary embedding (its rope scaling and ``apply_rotary_pos_emb`` convention): RoPE
   is linear in ``(cos, sin)``, so ``R`` is the model's rotation with the averaged ``cos``/``sin``
   (not a rotation itself); ``mu' = R mu`` and ``S' = R S R^T``;
3. ``logit_i = s mu'.k_i + s^2/2 k_i^T S' k_i`` with the model's attention scaling ``s`` (the
   paper's ``1/sqrt(d)``: ``mu'.k/sqrt(d) + k^T S' k/(2d)``), ``E[exp(s q.k)]`` for Gaussian ``q``;
4. softmax over the held keys but the sinks, mean over the query heads of each KV head;
5. ``score_i = (a_i + epsilon) ||v_i||``. The ``sinks`` first tokens are always kept.

When the statistics are taken. A step of several tokens (a prompt or a prefill chunk) takes them
from its own last ``max(new, buffer)`` attention inputs (the whole prompt of a one-pass prefill,
as the paper) and scores every held key. While decoding, the layer keeps the attention inputs of
the last ``buffer`` tokens (the ``hidden`` tier) and every ``refresh`` steps takes the statistics
from them and re-scores every held key, as kvpress's decoding press compresses every N steps from
a buffer of hidden states. The keys that arrive between refreshes are not scored yet and are kept
(a recent window of fewer than ``refresh`` tokens; should they fill the budget, the oldest goes
first); each overflowing step evicts the lowest-scored key of each KV head. The held keys' logits
are kept per query head (the ``scores`` tier, NaN = not scored yet), so each eviction
re-normalizes the softmax over exactly the scored keys held.

The score needs the attention *input* (a query projection, from kvbound's attention pre-hook),
never the attention weights, so it runs with any attention implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .base import nbytes
from .checks import check_int
from .codec import CodecOptions
from .allocation import AllocationOptions
from .evicting import EvictingCache, EvictingLayer
from .registry import register


@dataclass
class ExpectedAttentionOptions(AllocationOptions):  # a codec and an allocation; no think
    n_future: int = 512  # future positions RoPE is averaged over (T)
    sinks: int = 4  # first tokens always kept and left out of the statistics and the softmax
    buffer: int = 64  # decoding: attention inputs of the newest tokens the statistics come from
    refresh: int = 32  # decoding: steps between scorings (1 = every step); keys between them are kept
    epsilon: float = 0.0  # added to the expected attention before the ||v|| weighting
    covariance: bool = True  # include the k^T S k term (False: the mean query only)
    vnorm: bool = True  # weigh by ||v_i||


def averaged_rope(driver, layer_idx: int, start: int, count: int, like: torch.Tensor) -> torch.Tensor:
    """``R = mean_{p in [start, start+count)} R_p`` ``[D, D]`` float32 for layer ``layer_idx``, from the
    model's rotary embedding and RoPE function (``R x`` = RoPE of ``x`` with the mean ``cos``/``sin``)."""
    pos = torch.arange(start, start + count, device=like.device).unsqueeze(0)
    cos, sin = driver.position_embeddings(like, pos, layer_idx)  # [1, count, D]
    cos, sin = cos.float().mean(1, keepdim=True), sin.float().mean(1, keepdim=True)
    d = cos.shape[-1]
    eye = torch.eye(d, device=like.device).view(1, 1, d, d)  # rows e_j, each at the mean position
    return driver.rope(eye, cos.expand(1, d, d), sin.expand(1, d, d))[0, 0].T  # column j = R e_j


def query_statistics(queries: torch.Tensor, rope: torch.Tensor, covariance: bool
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean ``[B, H, D]`` and covariance ``[B, H, D, D]`` (float32) of pre-RoPE ``queries`` ``[B, H, m, D]``,
    rotated by the averaged RoPE ``rope``: ``R mu`` and ``R S R^T``."""
    q = queries.float()
    mu = q.mean(dim=2)
    cov = None
    if covariance:
        centered = q - mu.unsqueeze(2)
        cov = rope @ (centered.transpose(-1, -2) @ centered / q.shape[2]) @ rope.T
    return mu @ rope.T, cov


def expected_logits(keys: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``s mu_h.k_i + s^2/2 k_i^T S_h k_i`` per query head: keys ``[B, kv_heads, n, D]`` -> ``[B, heads, n]``."""
    b, kv, n, d = keys.shape
    groups = mu.shape[1] // kv
    k = keys.float()
    out = torch.einsum("bknd,bkgd->bkgn", k, mu.view(b, kv, groups, d)) * scaling
    if cov is not None:
        ks = torch.einsum("bknd,bkgde->bkgne", k, cov.view(b, kv, groups, d, d))
        out += (ks * k.unsqueeze(2)).sum(-1) * (scaling * scaling / 2)
    return out.reshape(b, kv * groups, n)


def expected_attention_scores(logits: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                              opts: ExpectedAttentionOptions) -> torch.Tensor:
    """Per-KV-head scores ``[B, kv_heads, n]`` from per-query-head ``logits`` ``[B, heads, n]`` (NaN: not
    scored yet): softmax over the scored non-sink keys, mean over each KV head's query heads,
    ``(a + epsilon) ||v||``. Sinks +inf; keys not scored yet rank above every scored one, oldest lowest."""
    b, kv, n = positions.shape
    sink = positions < opts.sinks  # [B, kv, n]
    groups = logits.shape[1] // kv
    unscored = logits[:, ::groups].isnan()  # [B, kv, n]: the same for every query head of a group
    masked = logits.view(b, kv, groups, n).masked_fill((sink | unscored).unsqueeze(2), float("-inf"))
    scores = torch.softmax(masked, dim=-1).nan_to_num(0.0).mean(dim=2)
    if opts.vnorm:
        scores = (scores + opts.epsilon) * values.float().norm(dim=-1)
    above = scores.amax(dim=-1, keepdim=True) + 1 + positions.float()
    return torch.where(unscored, above, scores).masked_fill(sink, float("inf"))


class ExpectedAttentionLayer(EvictingLayer):
    select_values = True
    batch_state = (*EvictingLayer.batch_state, "hidden")
    token_state = {"kv_logits": 2}  # [B, kv_heads, held, groups]: tokens on dim 2, gathered / packed with the keys

    @property
    def logits(self) -> torch.Tensor | None:
        """``[B, heads, held]`` float32: each held key's expected logit per query head (NaN: scored later)."""
        t = self.kv_logits
        return None if t is None else t.transpose(2, 3).reshape(t.shape[0], -1, t.shape[2])

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        kv = self.cache.kv_heads if value is not None else 0
        self.kv_logits = None if value is None else value.view(value.shape[0], kv, -1, value.shape[-1]).transpose(2, 3)

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.reset_policy()
        self.context_inputs = None  # compress(): the prefilled context's attention inputs (ContextRecorder)

    def reset_policy(self) -> None:
        self.kv_logits = None  # see logits
        self.hidden = None  # [B, <= buffer, hidden]: newest attention inputs (decoding statistics)
        self.since = 0  # steps since the last scoring
        self.pending_hidden = None  # this step's attention input (pre-hook)

    def policy_tiers(self) -> dict[str, int]:
        return {"scores": nbytes(self.kv_logits), "hidden": nbytes(self.hidden)}

    def score_all(self, keys: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, heads, n]`` of ``keys`` under the statistics of the attention inputs ``rows``
        ``[B, m, hidden]`` (the newest ending at ``seen - 1``; the sinks among them left out)."""
        opts, driver = self.cache.options, self.cache.driver
        skip = max(0, opts.sinks - (self.seen - rows.shape[1]))
        rows = rows[:, skip:] if skip < rows.shape[1] else rows[:, -1:]
        rope = averaged_rope(driver, self.layer_idx, self.seen, opts.n_future, rows)
        mu, cov = query_statistics(driver.prerope_query(self.layer_idx, rows), rope, opts.covariance)
        self.since = 0
        return expected_logits(keys, mu, cov, self.scaling())

    def select(self, keys, positions, query, query_pos, mass=None, values=None):
        opts = self.cache.options
        step, self.pending_hidden = self.pending_hidden, None
        if step is None:
            step, self.context_inputs = self.context_inputs, None
        if step is None:
            raise RuntimeError(f"expected-attention: no attention input for layer {self.layer_idx}; "
                               "the attention hooks did not run (call the model with this cache)")
        b, kv, n = keys.shape[0], keys.shape[1], keys.shape[-2]
        held = self.kv_logits
        old = 0 if held is None else held.shape[2]
        new = n - old
        rows = step if self.hidden is None else torch.cat([self.hidden, step], dim=1)
        self.hidden = rows[:, -opts.buffer:].clone()
        self.since += 1
        if new > 1 or held is None or self.since >= opts.refresh:
            self.logits = self.score_all(keys, rows[:, -max(new, opts.buffer):])  # [B, heads, n]
        else:  # decoding between scorings: the new key waits, unscored
            self.kv_logits = torch.cat([held, held.new_full((b, kv, new, held.shape[-1]), float("nan"))], 2)
        # kv_logits is aligned with keys: the base class keeps the selected entries with them
        if n <= self.capacity and self._valid is None:
            return None
        per_head = self.logits  # [B, heads, n]
        return self.keep(expected_attention_scores(per_head, values, positions, opts))


@register("expected-attention",
          "lossy: Expected Attention (Devoto et al. 2025) -- the attention a Gaussian of recent queries, RoPE-averaged "
          "over the next positions, is expected to give each key, times ||v||; `sinks` kept",
          exact=False, options=ExpectedAttentionOptions, beams=True,
          paper="Devoto, Jeblick, Jégou 2025, https://arxiv.org/abs/2510.00636")
class ExpectedAttentionCache(EvictingCache):
    layer_cls = ExpectedAttentionLayer

    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.parse_options(options)
        for name, low in (("n_future", 1), ("sinks", 0), ("buffer", 1), ("refresh", 1)):
            check_int(getattr(opts, name), name, "expected-attention", low)
        if isinstance(opts.epsilon, bool) or not isinstance(opts.epsilon, (int, float)) or not opts.epsilon >= 0:
            raise KVBoundError(f"expected-attention option epsilon must be a number >= 0, got {opts.epsilon!r}")
        for name in ("covariance", "vnorm"):
            if not isinstance(getattr(opts, name), bool):
                raise KVBoundError(f"expected-attention option {name} must be true or false, got {getattr(opts, name)!r}")
        if budget <= opts.sinks:
            raise KVBoundError(f"expected-attention needs budget > sinks, got budget {budget} and sinks {opts.sinks}")
        super().__init__(model, budget, opts)

    def compress(self, context, keep: int) -> None:
        """kvpress's protocol (:meth:`EvictingCache.compress`): the statistics come from every context
        token's attention input, as in a one-pass prefill (the recorder must keep them: ``inputs=True``)."""
        inputs = context.attention_inputs()
        for layer, rows in zip(self.layers, inputs):
            if not layer.is_sliding and rows is None:
                raise KVBoundError("expected-attention compresses a prefilled context from its attention inputs: "
                                   "record them (ContextRecorder(model, inputs=True))")
        for layer, rows in zip(self.layers, inputs):
            layer.context_inputs = rows  # select() takes them (reset() in the layer's compress keeps them)
        try:
            super().compress(context, keep)
        finally:
            for layer in self.layers:
                layer.context_inputs = None

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        super().observe_attention_input(layer_idx, hidden_states, kwargs)
        layer = self.layers[layer_idx]
        if not layer.is_sliding:
            layer.pending_hidden = hidden_states
