"""Greedy generation through a kvbound cache (the path the CLI and the bench share)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .cache.base import KVBoundCache
from .errors import KVBoundError


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise KVBoundError(f"prefill chunk must be a whole number of tokens >= 1, got {chunk!r}")


@torch.no_grad()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, cache: KVBoundCache, chunk: int | None) -> None:
    """Feed the tokens of ``input_ids`` the cache has not seen yet, ``chunk`` tokens per forward pass
    (``None``: one pass). The cache evicts, spills or checkpoints between chunks, so its hot K/V never
    exceeds budget + chunk and attention's transients are bounded by the chunk."""
    check_chunk(chunk)
    start = cache.get_seq_length()
    total = input_ids.shape[1]
    if start > total:
        raise KVBoundError(f"the cache has seen {start} tokens but the input has only {total}")
    step = total - start if chunk is None else chunk
    for pos in range(start, total, max(step, 1)):
        ids = input_ids[:, pos:pos + step]
        model(input_ids=ids, attention_mask=torch.ones_like(input_ids[:, :pos + ids.shape[1]]),
              past_key_values=cache, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def greedy(model: PreTrainedModel, input_ids: torch.Tensor, cache: KVBoundCache, max_new_tokens: int,
           stop_at_eos: bool = True, prefill_chunk: int | None = None) -> torch.Tensor:
    """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` (which may include earlier turns
    already in ``cache``). Returns only the new token ids, shape ``[batch, n]``.

    With ``prefill_chunk`` the prompt (all but its last token) is fed in chunks first (:func:`prefill`)."""
    if prefill_chunk is not None:
        prefill(model, input_ids[:, :-1], cache, prefill_chunk)
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
