"""Greedy generation through a kvbound cache (the path the CLI, the bench and speculative decoding share).

Long prompts are fed in chunks of ``prefill_chunk`` tokens (:func:`prefill`): between chunks the
cache evicts, spills or checkpoints, so its hot K/V never exceeds budget + chunk and attention's
transients (scores, the logits of the last position only) are bounded by the chunk instead of the
prompt. :data:`DEFAULT_PREFILL_CHUNK` was measured to be no slower than one-shot prefill on
SmolLM2-135M at ~2k and ~7.5k tokens (``kvbound bench --scenario prefill``; ``benchmarks/results/prefill-chunk``
and ``benchmarks/results/long-baseline``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from .cache.base import KVBoundCache, text_config
from .errors import KVBoundError
from .rss import decoding_threshold, returned_transients

DEFAULT_PREFILL_CHUNK = 1024  # tokens per prefill forward pass (see the module docstring)


def check_chunk(chunk: int | None) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise KVBoundError(f"prefill chunk must be a whole number of tokens >= 1, got {chunk!r}")


def max_positions(model: PreTrainedModel) -> int | None:
    """The model's position limit (``max_position_embeddings``), or ``None`` if it has none."""
    return getattr(text_config(model), "max_position_embeddings", None)


def check_positions(model: PreTrainedModel, prompt_tokens: int, max_new_tokens: int = 0, name: str | None = None) -> None:
    """Refuse a prompt (plus the tokens to generate) longer than the model's positions: past its
    limit a RoPE model does not fail, it silently extrapolates."""
    limit = max_positions(model)
    if limit is None:
        return
    what = f"model {name!r}" if name else "the model"
    if prompt_tokens > limit:
        raise KVBoundError(f"prompt is {prompt_tokens} tokens but {what} handles at most {limit} positions")
    if prompt_tokens + max_new_tokens > limit:
        raise KVBoundError(f"prompt ({prompt_tokens} tokens) + {max_new_tokens} new tokens exceeds the {limit} "
                           f"positions of {what}; generate {limit - prompt_tokens} new tokens or fewer")


@torch.no_grad()
def prefill(model: PreTrainedModel, input_ids: torch.Tensor, cache: KVBoundCache, chunk: int | None) -> None:
    """Feed the tokens of ``input_ids`` the cache has not seen yet, ``chunk`` tokens per forward pass
    (``None``: one pass), keeping only the last position's logits. A cache that rebuilds K/V from
    token ids takes them without a forward pass (:meth:`KVBoundCache.absorb_prompt`)."""
    check_chunk(chunk)
    start = cache.get_seq_length()
    total = input_ids.shape[1]
    if start > total:
        raise KVBoundError(f"the cache has seen {start} tokens but the input has only {total}")
    if cache.absorb_prompt(input_ids[:, start:]):
        return
    step = total - start if chunk is None else chunk
    with returned_transients():  # each chunk's freed tensors leave the process (see kvbound.rss)
        for pos in range(start, total, max(step, 1)):
            ids = input_ids[:, pos:pos + step]
            model(input_ids=ids, attention_mask=torch.ones_like(input_ids[:, :pos + ids.shape[1]]),
                  past_key_values=cache, use_cache=True, logits_to_keep=1)


def chunked_part(seen: int, total: int, chunk: int | None) -> int:
    """How many tokens :func:`prefill` feeds before the last chunk, which the first decoding step
    feeds itself (so a prompt that fits one chunk runs exactly as without chunking)."""
    if chunk is None or total - seen <= chunk:
        return seen
    return seen + (total - seen - 1) // chunk * chunk


@dataclass
class Timings:
    """Split of one generation: ``prefill_seconds`` is the wall time to the first token (every
    prompt chunk included), ``decode_seconds`` the rest. The ``*_cpu_seconds`` are this process's
    CPU time over the same spans: on a CPU shared with other jobs they move far less than wall time
    (with one torch thread they are the work done)."""

    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    new_tokens: int = 0
    prefill_cpu_seconds: float = 0.0
    decode_cpu_seconds: float = 0.0
    stamps: list[tuple[float, float]] = field(default_factory=list, repr=False)  # (wall, cpu) per step

    def split(self, start: tuple[float, float], end: tuple[float, float]) -> None:
        """Set the prefill/decode split from the run's start and end (wall, cpu) and the step stamps."""
        first = self.stamps[0] if self.stamps else end
        self.prefill_seconds, self.decode_seconds = first[0] - start[0], end[0] - first[0]
        self.prefill_cpu_seconds, self.decode_cpu_seconds = first[1] - start[1], end[1] - first[1]

    @property
    def seconds_per_token(self) -> float:
        """Decode seconds per token after the first (the prefill's time if only one was made)."""
        return self.decode_seconds / (self.new_tokens - 1) if self.new_tokens > 1 else self.prefill_seconds

    @property
    def cpu_seconds_per_token(self) -> float:
        return self.decode_cpu_seconds / (self.new_tokens - 1) if self.new_tokens > 1 else self.prefill_cpu_seconds


def now() -> tuple[float, float]:
    """(wall clock, this process's CPU time)."""
    return time.perf_counter(), time.process_time()


class _Clock(LogitsProcessor):
    """Timestamps each decoding step (called right after each forward pass). ``mapped_decoding``:
    keep prefill's allocator setting while decoding (a policy whose every step re-runs the model
    over the evicted span has prefill-sized transients at every step, see :mod:`kvbound.rss`)."""

    def __init__(self, device: torch.device, stamps: list[tuple[float, float]], mapped_decoding: bool = False) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stamps = stamps
        self.mapped_decoding = mapped_decoding

    def __call__(self, input_ids, scores):
        self.sync()
        if not self.stamps and not self.mapped_decoding:  # the prompt is done: decoding reuses its blocks
            decoding_threshold()
        self.stamps.append(now())
        return scores


@torch.no_grad()
def generate(model: PreTrainedModel, input_ids: torch.Tensor, cache: KVBoundCache, max_new_tokens: int, *,
             stop_at_eos: bool = True, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
             processors: list[LogitsProcessor] | None = None, output_logits: bool = False,
             timings: Timings | None = None):
    """``model.generate`` (greedy) after a chunked :func:`prefill`; returns its output
    (``return_dict_in_generate``) and fills ``timings`` if given."""
    check_chunk(prefill_chunk)
    check_positions(model, input_ids.shape[1], max_new_tokens)
    timings = Timings() if timings is None else timings
    clock = _Clock(input_ids.device, timings.stamps, getattr(cache, "reruns_model", False))
    start = now()
    cut = chunked_part(cache.get_seq_length(), input_ids.shape[1], prefill_chunk)
    with returned_transients():  # every prompt chunk, the last one (the first step) included
        if cut > cache.get_seq_length():
            prefill(model, input_ids[:, :cut], cache, prefill_chunk)
        out = _generate(model, input_ids, cache, max_new_tokens, stop_at_eos, clock, processors, output_logits)
    timings.split(start, now())
    timings.new_tokens = out.sequences.shape[1] - input_ids.shape[1]
    return out


def _generate(model, input_ids, cache, max_new_tokens, stop_at_eos, clock, processors, output_logits):
    eos = model.generation_config.eos_token_id if stop_at_eos else None
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else eos if isinstance(eos, int) else (eos[0] if eos else 0)
    return model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=cache,
        max_new_tokens=max_new_tokens, min_new_tokens=0 if stop_at_eos else max_new_tokens, do_sample=False,
        temperature=None, top_p=None, top_k=None, eos_token_id=eos, pad_token_id=pad,
        logits_processor=LogitsProcessorList([clock, *(processors or [])]),
        output_logits=output_logits, return_dict_in_generate=True,
    )


def greedy(model: PreTrainedModel, input_ids: torch.Tensor, cache: KVBoundCache, max_new_tokens: int,
           stop_at_eos: bool = True, prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
           timings: Timings | None = None) -> torch.Tensor:
    """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` (which may include earlier turns
    already in ``cache``). Returns only the new token ids, shape ``[batch, n]``.

    The unseen prompt is fed ``prefill_chunk`` tokens per forward pass (``None``: one pass);
    ``timings`` (a :class:`Timings`) receives the prefill/decode split."""
    out = generate(model, input_ids, cache, max_new_tokens, stop_at_eos=stop_at_eos,
                   prefill_chunk=prefill_chunk, timings=timings)
    return out.sequences[:, input_ids.shape[1]:]
