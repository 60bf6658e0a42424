"""Greedy generation through a kvbound cache (the path the CLI and the bench share)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .cache.base import KVBoundCache


@torch.no_grad()
def greedy(model: PreTrainedModel, input_ids: torch.Tensor, cache: KVBoundCache, max_new_tokens: int,
           stop_at_eos: bool = True) -> torch.Tensor:
    """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` (which may include earlier turns
    already in ``cache``). Returns only the new token ids, shape ``[batch, n]``."""
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    out = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        past_key_values=cache,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0 if stop_at_eos else max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        eos_token_id=eos,
        pad_token_id=eos if isinstance(eos, int) else (eos[0] if eos else 0),
    )
    return out[:, input_ids.shape[1]:]
