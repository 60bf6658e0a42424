"""One decode step for many conversations in one forward pass, each with its own kvbound cache.

Every row of the batch is one conversation's next token. The model runs its embeddings,
projections, MLPs and LM head over all rows together -- on a CPU decoding a small model is bound
by reading the weights, and a batch reads them once for every row. Attention is per row: the
model is handed a :class:`CacheBatch` as ``past_key_values``; its per-layer :meth:`CacheBatch.update`
splits the rows and calls each conversation's own layer ``update`` (with that cache active, so an
exact policy hands over its recalled blocks and a scored policy its scoring callback, exactly as
when the conversation runs alone), and kvbound's attention function (:mod:`kvbound.attention`)
then attends each row to what its own layer returned (:meth:`CacheBatch.attend_rows`) -- ragged
lengths, no padding of K/V, no mask. Position ids are per row.

Batch invariance (:func:`padded_rows`): a row's projections round differently in a matmul of one
row than in one of several (measured on this machine's MKL: M = 1, 2, 3 each differ from M = 16;
every M >= 4 that is a multiple of 4, and every M >= 12, gives the same bits per row at 1 and 2
threads). With ``row_group`` 4 the batch is padded with dummy rows to such a size, so a greedy
reply does not depend on how many other conversations share its steps -- including none.

What cannot run batched (:func:`batch_refusal`): policies that observe the step's input ids or
residuals through the model hooks (kv-direct, residual) or re-run the model inside a step, and
models whose attention does not go through kvbound's attention function.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache

from . import attention
from .cache.base import KVBoundCache
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
    for hook in ("observe_input_ids", "observe_layer_input"):
        if getattr(cls, hook) is not getattr(KVBoundCache, hook):
            return f"policy {cache.policy_name!r} observes each step's {hook[8:].replace('_', ' ')} (one sequence per pass)"
    if not use_tiered_attention(cache.model):
        return (f"the model runs {cache.model.config._attn_implementation!r} attention, not kvbound's "
                "(per-row attention needs it)")
    return None


class CacheBatch(Cache):
    """``past_key_values`` for one batched decode step: row ``i`` is ``caches[i]`` (``None``: a padding row).

    Only for one new token per row. ``update`` returns its inputs unchanged; the rows' own K/V are
    kept for :meth:`attend_rows`, which kvbound's attention function calls instead of attending."""

    def __init__(self, caches: Sequence[KVBoundCache | None]) -> None:
        super().__init__(layers=[])
        self.caches = list(caches)
        self._rows: dict[int, list[tuple[torch.Tensor, torch.Tensor, attention.TierStep | None]]] = {}

    # transformers asks these of any cache; the rows' lengths differ, masks are not used
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def observe_input_ids(self, input_ids) -> None:  # the hooks' calls: batchable policies need none
        pass

    def observe_layer_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        pass

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict[str, Any] | None = None):
        rows = []
        for i, cache in enumerate(self.caches):
            k, v = key_states[i:i + 1], value_states[i:i + 1]
            step = None
            if cache is not None:
                attention.push(cache)  # the row's layer sees its own cache active, as when it runs alone
                try:
                    k, v = cache.update(k, v, layer_idx, cache_kwargs)
                finally:
                    attention.pop()
                step = attention.take_step(cache.layers[layer_idx], k)
            rows.append((k, v, step))
        self._rows[layer_idx] = rows
        return key_states, value_states

    def attend_rows(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    **kwargs: Any):
        """Attention of each row's query over its own cache's K/V (``[B, 1, heads, D]`` like ``sdpa``'s)."""
        rows = self._rows.pop(module.layer_idx)
        kwargs.pop("attention_mask", None)
        outs = [attention.attend_step(module, query[i:i + 1], k, v, None, step, **kwargs)[0]
                for i, (k, v, step) in enumerate(rows)]
        return torch.cat(outs, dim=0), None


@torch.no_grad()
def decode_step(model, caches: Sequence[KVBoundCache], tokens: Sequence[int], row_group: int = ROW_GROUP) -> torch.Tensor:
    """Feed ``tokens[i]`` to ``caches[i]`` for every ``i`` in one forward pass; returns the next-token
    logits, ``[len(caches), vocab]``. The batch is padded to :func:`padded_rows` rows."""
    n = len(caches)
    m = padded_rows(n, row_group)
    ids = torch.tensor([*tokens, *([0] * (m - n))], dtype=torch.long).view(m, 1)
    positions = torch.tensor([*(c.get_seq_length() for c in caches), *([0] * (m - n))], dtype=torch.long).view(m, 1)
    batch = CacheBatch([*caches, *([None] * (m - n))])
    mask = torch.ones(m, 1, 1, 1, dtype=torch.bool)  # a 4-D mask is used as given: no mask is built (unused)
    out = model(input_ids=ids, position_ids=positions, attention_mask=mask, past_key_values=batch, use_cache=True,
                logits_to_keep=1)
    return out.logits[:n, -1]
