"""One forward pass for many conversations' next steps, each with its own kvbound cache.

:func:`packed_step` lays the step's tokens out as one row, cut into segments: one token for a
conversation that decodes, a prompt chunk for one that prefills. The model runs its embeddings,
projections, MLPs and LM head over all tokens together -- on a CPU decoding a small model is bound
by reading the weights, and a pass reads them once for every token. Attention is per segment: the
model is handed a :class:`CacheBatch` as ``past_key_values``; its per-layer :meth:`CacheBatch.update`
cuts the step's K/V into segments and calls each conversation's own layer ``update`` (with that
cache active, so an exact policy hands over its recalled blocks and a scored policy its scoring
callback, exactly as when the conversation runs alone), and kvbound's attention function
(:mod:`kvbound.attention`) then attends each segment to what its own layer returned
(:meth:`CacheBatch.attend_rows`), causally within the segment -- ragged lengths, no padding of
K/V. Position ids are per token. :func:`decode_step` is the case of one token per conversation.

Batch invariance (:func:`padded_rows`): a token's projections round differently in a matmul of one
row than in one of several (measured on this machine's MKL: M = 1, 2, 3 each differ from M = 16;
every M >= 4 that is a multiple of 4, and every M >= 12, gives the same bits per row at 1 and 2
threads). With ``row_group`` 4 the batch is padded with dummy rows to such a size, so a greedy
reply does not depend on how many other conversations share its steps -- including none.
A prompt's attention is the other part that depends on how it is cut: its queries attending in one
call can round differently from the same queries cut into pieces over several passes. With ``query_block`` N a segment with no tiered step
(``full`` and every plain-K/V policy) attends in blocks of queries cut at multiples of N positions,
so a prompt fed whole and the same prompt fed in pieces that end at multiples of N compute the same
calls bit for bit (the server cuts its pieces so while other conversations decode).

What cannot run batched (:func:`batch_refusal`): policies that observe the step's input ids or
residuals through the model hooks (kv-direct, residual) or re-run the model inside a step, and
models whose attention does not go through kvbound's attention function.
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache

from . import attention
from .cache.base import KVBoundCache
from .errors import KVBoundError
from .cache.hooks import use_tiered_attention
from .cache.registry import get_policy

ROW_GROUP = 4  # rows per group of the padded batch (see the module docstring)
_INVARIANT_FROM = 12  # from this many rows on, every M gives the same bits per row (measured, MKL)


def padded_rows(rows: int, row_group: int = ROW_GROUP) -> int:
    """How many rows the forward pass runs for ``rows`` conversations: ``rows`` itself with
    ``row_group`` 1, else the next size whose matmuls round every row as any other such size does."""
    if row_group <= 1 or rows >= _INVARIANT_FROM:
        return rows
    return max(row_group, -(-rows // row_group) * row_group)


def batch_refusal(cache: KVBoundCache) -> str | None:
    """Why conversations under ``cache``'s policy cannot share a forward pass (``None``: they can).
    Switches the model to kvbound's attention function (``sdpa`` otherwise, unchanged for one sequence)."""
    spec = get_policy(cache.policy_name)
    if spec.reruns_model:
        return f"policy {cache.policy_name!r} re-runs the model inside each step"
    cls = type(cache)
    from .cache.evicting import EvictingCache, EvictingLayer

    # a compressed context (kvpress's protocol) selects nothing any more: its observation hooks are idle
    compressed = isinstance(cache, EvictingCache) and all(getattr(layer, "compressed", False) for layer in cache.layers)
    for hook in ("observe_input_ids", "observe_layer_input", "observe_output"):
        if not compressed and getattr(cls, hook) is not getattr(KVBoundCache, hook):
            return f"policy {cache.policy_name!r} observes each step's {hook[8:].replace('_', ' ')} (one sequence per pass)"
    if isinstance(cache, EvictingCache) and not compressed:  # the attention input, which a batched pass does not hand to each row
        if cls.observe_attention_input is not EvictingCache.observe_attention_input or any(
                type(layer).observe_input is not EvictingLayer.observe_input for layer in cache.layers):
            return f"policy {cache.policy_name!r} observes each step's attention input (one sequence per pass)"
    if not use_tiered_attention(cache.model):
        return (f"the model runs {cache.model.config._attn_implementation!r} attention, not kvbound's "
                "(per-row attention needs it)")
    return None


class CacheBatch(Cache):
    """``past_key_values`` for one packed step: the step's tokens are one row, ``[1, T]``, cut into
    segments; segment ``i`` (``spans[i]`` tokens) belongs to ``caches[i]`` (``None``: padding).

    ``update`` hands each segment's new K/V to its own cache and returns its inputs unchanged; the
    segments' own K/V are kept for :meth:`attend_rows`, which kvbound's attention function calls
    instead of attending."""

    def __init__(self, caches: Sequence[KVBoundCache | None], spans: Sequence[int] | None = None,
                 firsts: Sequence[int] | None = None, query_block: int | None = None) -> None:
        super().__init__(layers=[])
        self.caches = list(caches)
        self.spans = [1] * len(self.caches) if spans is None else list(spans)
        self.starts = [0, *itertools.accumulate(self.spans)][:-1]
        self.firsts = [0] * len(self.caches) if firsts is None else list(firsts)  # each segment's first position
        self.query_block = query_block
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, attention.TierStep | None]]] = {}

    # transformers asks these of any cache; the segments' lengths differ, masks are not used
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def observe_input_ids(self, input_ids) -> None:  # the hooks' calls: batchable policies need none
        pass

    def observe_layer_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        pass

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        pass

    def observe_output(self) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None):
        rows = []
        for cache, start, span in zip(self.caches, self.starts, self.spans):
            k, v = key_states[:, :, start:start + span], value_states[:, :, start:start + span]
            step = None
            if cache is not None:
                attention.push(cache)  # the segment's layer sees its own cache active, as when it runs alone
                try:
                    k, v = cache.update(k, v, layer_idx, _segment_kwargs(cache_kwargs, start, span))
                finally:
                    attention.pop()
                step = attention.take_step(cache.layers[layer_idx], k)
            rows.append((k, v, step))
        self._rows[layer_idx] = rows
        return key_states, value_states

    def attend_rows(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    **kwargs: Any):
        """Attention of each segment's queries over its own cache's K/V, causal within the segment
        (``[1, T, heads, D]`` like ``sdpa``'s)."""
        rows = self._rows.pop(module.layer_idx)
        kwargs.pop("attention_mask", None)
        outs = []
        for (k, v, step), cache, start, span, first in zip(rows, self.caches, self.starts, self.spans, self.firsts):
            q = query[:, :, start:start + span]
            if step is None and span > 1 and self.query_block and cache is not None:
                past = k.shape[-2] - span  # a plain layer returns its past, then the segment's own keys
                window = getattr(module, "sliding_window", None)
                for a, b in query_blocks(first, span, self.query_block):
                    # a sliding layer: from the window - 1 keys before the block, as a piece starting there holds
                    lo = 0 if window is None else max(0, past + a - (window - 1))
                    kb, vb = k[..., lo:past + b, :], v[..., lo:past + b, :]
                    mask = _segment_mask(module, b - a, kb, None)
                    outs.append(attention.attend_step(module, q[:, :, a:b], kb, vb, mask, None, **kwargs)[0])
                continue
            mask = _segment_mask(module, span, k, step)
            outs.append(attention.attend_step(module, q, k, v, mask, step, **kwargs)[0])
        return torch.cat(outs, dim=1), None


def query_blocks(first: int, span: int, block: int) -> list[tuple[int, int]]:
    """The ``[a, b)`` query ranges (within a segment of ``span`` tokens starting at position ``first``)
    cut at the positions that are multiples of ``block``."""
    cuts, a = [], 0
    while a < span:
        b = min(span, (first + a) // block * block + block - first)
        cuts.append((a, b))
        a = b
    return cuts


def _segment_kwargs(cache_kwargs: dict[str, Any] | None, start: int, span: int) -> dict[str, Any] | None:
    """The per-token entries of ``cache_kwargs`` (RoPE ``cos``/``sin``, ``cache_position``) of one segment."""
    if not cache_kwargs:
        return cache_kwargs
    out = dict(cache_kwargs)
    for name in ("cos", "sin"):
        if isinstance(out.get(name), torch.Tensor) and out[name].dim() >= 2:
            out[name] = out[name][..., start:start + span, :]
    if isinstance(out.get("cache_position"), torch.Tensor):
        out["cache_position"] = out["cache_position"][start:start + span]
    return out


def _segment_mask(module: torch.nn.Module, t: int, new_keys: torch.Tensor,
                  step: attention.TierStep | None) -> torch.Tensor | None:
    """Which of a segment's keys (its ``step``'s recalled blocks, then ``new_keys``: its past and its
    ``t`` new tokens) each of its ``t`` queries sees: causal, bottom-right aligned, within the layer's
    sliding window if it has one. ``None`` when nothing needs masking (one query, no window) or when
    kvbound's tiered attention builds the causal part itself (a ``step``, no window)."""
    window = getattr(module, "sliding_window", None)
    if window is None and (t == 1 or step is not None):  # the decode rows' common case: nothing to count
        return None
    n = new_keys.shape[-2] + (0 if step is None else sum(attention.block_tokens(b) for b in step.blocks))
    if t == 1 and n <= window:
        return None
    device = new_keys.device
    q = torch.arange(n - t, n, device=device)[:, None]
    cols = torch.arange(n, device=device)[None, :]
    visible = cols <= q
    if window is not None:  # a sliding layer holds a contiguous suffix of positions
        visible &= cols > q - window
    return visible.view(1, 1, t, n)


@torch.no_grad()
def packed_step(model, caches: Sequence[KVBoundCache], segments: Sequence[Sequence[int]],
                row_group: int = ROW_GROUP, query_block: int | None = None) -> torch.Tensor:
    """Feed ``segments[i]`` (token ids: one for a decode step, several for a prompt chunk) to
    ``caches[i]`` for every ``i`` in one forward pass over all their tokens; returns the logits after
    each segment's last token, ``[len(caches), vocab]``.

    Projections, MLPs and the LM head run over every token together; attention per segment against
    its own cache. The tokens are padded to :func:`padded_rows` (and so are the LM head's rows), so a
    segment's numbers do not depend on what else shares the pass; with ``query_block`` a plain
    segment attends in query blocks cut at multiples of it (see the module docstring)."""
    n = len(caches)
    spans = [len(s) for s in segments]
    if n == 0 or min(spans) < 1:
        raise ValueError("packed_step needs at least one segment, each with at least one token")
    if not use_tiered_attention(model):  # per-segment attention happens inside kvbound's attention function
        raise KVBoundError(f"a packed step needs kvbound's attention: load the model with attn_implementation='sdpa' "
                           f"(it runs {model.config._attn_implementation!r})")
    total = sum(spans)
    m = padded_rows(total, row_group)
    ids, positions, firsts = [], [], []
    for cache, seg in zip(caches, segments):
        seen = cache.get_seq_length()
        ids.extend(seg)
        positions.extend(range(seen, seen + len(seg)))
        firsts.append(seen)
    pad = m - total
    batch = CacheBatch([*caches, *([None] if pad else [])], [*spans, *([pad] if pad else [])],
                       [*firsts, *([0] if pad else [])], query_block)
    ids.extend([0] * pad)
    positions.extend(range(pad))
    ends = [start + span - 1 for start, span in zip(batch.starts, spans)]
    rows = padded_rows(n, row_group)
    keep = torch.tensor(ends + [ends[-1]] * (rows - n), dtype=torch.long)
    mask = torch.ones(1, 1, m, 1, dtype=torch.bool)  # a 4-D mask is used as given: no mask is built (unused)
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), position_ids=torch.tensor([positions], dtype=torch.long),
                attention_mask=mask, past_key_values=batch, use_cache=True, logits_to_keep=keep)
    return out.logits[0, :n]


def decode_step(model, caches: Sequence[KVBoundCache], tokens: Sequence[int], row_group: int = ROW_GROUP) -> torch.Tensor:
    """Feed ``tokens[i]`` to ``caches[i]`` for every ``i`` in one forward pass (:func:`packed_step`
    with one-token segments); returns the next-token logits, ``[len(caches), vocab]``."""
    return packed_step(model, caches, [[t] for t in tokens], row_group)


@torch.no_grad()
def greedy_rows(model, caches: Sequence[KVBoundCache], prompts: Sequence[Sequence[int]],
                max_new_tokens: Sequence[int], eos: Sequence[int] = (), row_group: int = ROW_GROUP) -> list[list[int]]:
    """Greedy replies of several sequences, each continuing its own cache, decoded together: every
    step is one :func:`packed_step` over the rows still going (the first carries each row's whole
    ``prompt``, the tokens its cache has not seen). A row stops after ``max_new_tokens[i]`` tokens or
    after an ``eos`` token (kept in its reply, as ``generate`` keeps it). Returns each row's new tokens.

    Every cache must be batchable (:func:`batch_refusal`); with ``row_group`` > 1 each reply is the
    one its sequence gets alone in a packed step (see the module docstring)."""
    if not (len(caches) == len(prompts) == len(max_new_tokens)):
        raise ValueError("greedy_rows needs one prompt and one max_new_tokens per cache")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("greedy_rows needs at least one prompt token per row (the token its reply follows)")
    stop = set(eos)
    replies: list[list[int]] = [[] for _ in caches]
    going = [i for i, n in enumerate(max_new_tokens) if n > 0]
    segments = {i: list(prompts[i]) for i in going}
    while going:
        logits = packed_step(model, [caches[i] for i in going], [segments[i] for i in going], row_group)
        nxt = logits.argmax(-1).tolist()
        still = []
        for i, token in zip(going, nxt):
            replies[i].append(token)
            segments[i] = [token]
            if token not in stop and len(replies[i]) < max_new_tokens[i]:
                still.append(i)
        going = still
    return replies
