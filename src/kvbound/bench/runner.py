"""What the scenarios share: :class:`Bench` (model, policies, results, progress), :class:`Context`
(what a scenario's ``run`` gets), greedy :func:`decode` with timings and RSS, per-tier memory,
policy variants (``name:key=value,...``) and one-line failure records. Scenarios append records
to a :class:`~kvbound.bench.results.Results` as soon as they are measured (so an interrupt keeps them)
and never hard-code the policy list."""

from __future__ import annotations

import argparse
import gc
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessor

from ..cache import make_cache, registered
from ..cache.registry import PolicySpec
from ..cache.base import KVBoundCache
from ..errors import KVBoundError
from ..generation import DEFAULT_PREFILL_CHUNK, Timings, generate
from ..rss import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .inputs import Budget, Prompt
from .results import Results

REFERENCE = "full"


# --------------------------------------------------------------------------- decoding


class _Force(LogitsProcessor):
    """Teacher forcing: make step ``i`` choose ``tokens[i]`` (raw logits are still reported)."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.tokens[self.step]] = 0.0
        self.step += 1
        return forced


@dataclass
class Decoded:
    tokens: list[int]
    logits: torch.Tensor | None  # [N, vocab] raw next-token logits, float32 on CPU
    prefill_seconds: float
    seconds_per_token: float  # decode steps after the prefill
    peak_rss_bytes: int = 0  # process high-water mark during this call (reset to the RSS at its start)
    rss_added_bytes: int | None = None  # that peak minus the RSS at the start (None: the OS cannot reset it)


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, cache: KVBoundCache, max_new_tokens: int, *,
           force: list[int] | None = None, stop_at_eos: bool = False, keep_logits: bool = True,
           prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK) -> Decoded:
    """Greedy decoding through :func:`kvbound.generation.generate` (the path ``kvbound generate``
    uses), optionally teacher-forced on ``force``; returns tokens, raw logits and step timings."""
    n = len(force) if force is not None else max_new_tokens
    timings = Timings()
    gc.collect()
    base, reset = current_rss_bytes(), reset_peak_rss()
    out = generate(model, input_ids, cache, n, stop_at_eos=stop_at_eos, prefill_chunk=prefill_chunk,
                   processors=[_Force(force)] if force is not None else None, output_logits=keep_logits,
                   timings=timings)
    tokens = out.sequences[0, input_ids.shape[1]:].tolist()
    logits = torch.cat(out.logits).float().cpu() if keep_logits else None
    peak = peak_rss_bytes()
    return Decoded(tokens, logits, timings.prefill_seconds, timings.seconds_per_token, peak,
                   peak - base if reset else None)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


def split_policies(text: str) -> list[str]:
    """``"full,kivi:bits=2,group=32,window"`` -> ``["full", "kivi:bits=2,group=32", "window"]``: a
    comma-separated item ``key=value`` without a ``:`` belongs to the policy variant before it."""
    out: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if "=" in item and ":" not in item and out:
            out[-1] += "," + item
        else:
            out.append(item)
    return out


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def policy_name(label: str) -> str:
    """The registered policy of a variant label (``"kivi:bits=2"`` -> ``"kivi"``)."""
    return label.partition(":")[0]


def policy_options(label: str) -> dict[str, Any]:
    """The options of a variant label (``"kivi:bits=2,clip=false"`` -> ``{"bits": 2, "clip": False}``)."""
    rest = label.partition(":")[2]
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise KVBoundError(f"policy variant {label!r}: options are key=value, got {item!r}")
        options[key.strip()] = _value(value.strip())
    return options


def spec(label: str) -> PolicySpec:
    """The registry entry of a policy or variant label."""
    return registered()[policy_name(label)]


def _cache_for(model, policy: str, budget: int | None) -> KVBoundCache:
    return make_cache(model, policy_name(policy), budget if spec(policy).needs_budget else None,
                      **policy_options(policy))


def _memory(cache: KVBoundCache) -> dict[str, Any]:
    """Bytes by tier and peaks, and whether this cache is exact (a variant's options, e.g. a lossy codec
    on an exact policy, can change it)."""
    tiers = cache.bytes_by_tier()
    return {
        "exact": bool(getattr(cache, "exact", True)),
        "hot_kv_bytes": tiers.get("hot_kv", 0),
        "peak_hot_kv_bytes": cache.peak_hot_kv_bytes,
        "bytes_by_tier": tiers,
        "total_cache_bytes": sum(tiers.values()),
        "peak_transient_bytes": cache.peak_transient_bytes,
        "tokens_seen": cache.get_seq_length(),
    }


def _failure(exc: BaseException) -> tuple[str, str]:
    """(status, one-line reason) for a policy that could not run."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    if isinstance(exc, KVBoundError):
        return "skipped", line
    return "error", f"{type(exc).__name__}: {line}"


def _close(cache: KVBoundCache | None) -> None:
    if cache is not None:
        cache.close()


@dataclass
class Bench:
    """Everything a scenario needs; ``on_record`` is called after every saved run (tests use it)."""

    model: Any
    tokenizer: Any
    policies: list[str]
    results: Results
    max_new_tokens: int
    seed: int = 0
    progress: Callable[..., Any] | None = None  # tqdm-like factory
    on_record: Callable[[dict[str, Any]], None] = field(default=lambda record: None)
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK

    @property
    def device(self) -> torch.device:
        return self.model.device

    def bar(self, total: int, desc: str):
        if self.progress is None:
            return _NoBar()
        return self.progress(total=total, desc=desc, unit="run", dynamic_ncols=True)

    def save_run(self, record: dict[str, Any]) -> None:
        self.results.add_run(record)
        self.on_record(record)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix_str(self, s: str) -> None: ...
    def close(self) -> None: ...


@dataclass
class Context:
    """What a scenario's ``run`` gets: the parsed arguments, its validated ``options`` (also in
    ``meta.options``), the :class:`Results` to append to, and a :class:`Bench` with the model loaded
    (``None`` for a scenario whose module sets ``NEEDS_MODEL = False``)."""

    args: argparse.Namespace
    options: dict[str, Any]
    results: Results
    bench: Bench | None = None
    policies: list[str] = field(default_factory=list)
    budgets: list[Budget] = field(default_factory=list)

    def bar(self, total: int, desc: str):
        if self.bench is not None:
            return self.bench.bar(total, desc)
        if getattr(self.args, "no_progress", True):
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True)

    def save_run(self, record: dict[str, Any]) -> None:
        if self.bench is not None:
            self.bench.save_run(record)
        else:
            self.results.add_run(record)


def reference_first(policies: list[str]) -> list[str]:
    """``full`` first (the reference every scenario compares with), then the others in order."""
    return [REFERENCE] + [p for p in policies if p != REFERENCE]


def encode_prompt(tokenizer, prompt: Prompt, device) -> torch.Tensor:
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    return ids.to(device)




# --------------------------------------------------------------------------- quality scenarios


PAPER_ROWS = ("kv-direct", "window")  # the KV-Direct paper's perplexity table: full, KV-Direct, window-only


def quality_order(policies: list[str]) -> list[str]:
    """``full``, then the paper's rows (``kv-direct``, ``window``), then the other lossy policies,
    then the other exact ones (an interrupted run keeps the paper's table first)."""
    others = [p for p in policies if p != REFERENCE]
    return [REFERENCE] + sorted(others, key=lambda p: (p not in PAPER_ROWS, PAPER_ROWS.index(p) if p in PAPER_ROWS
                                                       else 0, spec(p).exact, p))


def quality_jobs(policies: list[str], budgets: list[Budget]) -> list[tuple[str, Budget | None]]:
    return [(p, b) for p in quality_order(policies) for b in (budgets if spec(p).needs_budget else [None])]


def chunk_option(args: argparse.Namespace, default: int) -> int:
    chunk = args.chunk if args.chunk is not None else default
    if chunk < 1:
        raise KVBoundError(f"--chunk must be >= 1 token, got {chunk}")
    return chunk


def positive_ints(text: str, what: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (``--lengths``, ``--batch-sizes``...)."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise KVBoundError(f"--{what} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise KVBoundError(f"--{what} must be comma-separated whole numbers >= 1, got {text!r}")
    return values
