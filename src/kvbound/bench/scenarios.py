"""The four bench scenarios. Each appends records to a :class:`~kvbound.bench.results.Results`
as soon as they are measured (so an interrupt keeps them) and never hard-codes the policy list.

* :func:`budget_sweep` -- policy x budget x prompt, greedy, compared with ``full`` on the same prompt;
* :func:`multiturn` -- one cache per policy across a whole chat;
* :func:`bytes_per_token` -- analytic bytes/token next to measured steady states;
* :func:`latency` -- reading one layer's cached K/V vs recomputing it from residuals.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessor

from ..cache import make_cache, registered
from ..cache.base import KVBoundCache
from ..cache.model_info import kv_bytes_per_token, text_config
from ..errors import KVBoundError
from ..generation import DEFAULT_PREFILL_CHUNK, Timings, generate
from ..rss import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from . import metrics
from .inputs import Budget, Conversation, Prompt
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


def _cache_for(model, policy: str, budget: int | None) -> KVBoundCache:
    spec = registered()[policy]
    return make_cache(model, policy, budget if spec.needs_budget else None)


def _memory(cache: KVBoundCache) -> dict[str, Any]:
    tiers = cache.bytes_by_tier()
    return {
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


def encode_prompt(tokenizer, prompt: Prompt, device) -> torch.Tensor:
    ids = tokenizer(prompt.text, return_tensors="pt").input_ids
    return ids.to(device)


# --------------------------------------------------------------------------- budget sweep


def budget_sweep(bench: Bench, prompts: list[Prompt], budgets: list[Budget]) -> None:
    """Every policy x budget x prompt, greedy, scored against ``full`` on the same prompt.

    ``full`` runs once per prompt (its record has ``budget`` null); policies that need no budget
    also run once per prompt. ``mean_kl`` is teacher-forced on full's continuation: when a policy's
    greedy tokens equal full's, its greedy logits already are the teacher-forced ones; otherwise a
    fresh cache replays full's tokens (untimed).
    """
    specs = registered()
    others = [p for p in bench.policies if p != REFERENCE]
    per_prompt = 1 + sum(len(budgets) if specs[p].needs_budget else 1 for p in others)
    bar = bench.bar(len(prompts) * per_prompt, "budget-sweep")
    try:
        for prompt in prompts:
            ids = encode_prompt(bench.tokenizer, prompt, bench.device)
            context = ids.shape[1]
            bar.set_postfix_str(f"{prompt.name}: full")
            _seed(bench.seed)
            ref_cache = make_cache(bench.model, REFERENCE)
            ref = decode(bench.model, ids, ref_cache, bench.max_new_tokens, prefill_chunk=bench.prefill_chunk)
            ref_record = _sweep_record(bench, REFERENCE, None, None, prompt, context, ref, ref_cache, ref, 0.0)
            _close(ref_cache)
            bench.save_run(ref_record)
            bar.update()
            for budget in budgets:
                for policy in others:
                    if not specs[policy].needs_budget and budget is not budgets[0]:
                        continue
                    tokens = budget.tokens(context) if specs[policy].needs_budget else None
                    label = budget.label if specs[policy].needs_budget else None
                    bar.set_postfix_str(f"{prompt.name}: {policy} @ {label}")
                    bench.save_run(_sweep_one(bench, policy, tokens, label, prompt, context, ids, ref))
                    bar.update()
    finally:
        bar.close()


def _sweep_one(bench: Bench, policy: str, budget: int | None, label: str | None, prompt: Prompt,
               context: int, ids: torch.Tensor, ref: Decoded) -> dict[str, Any]:
    cache = forced_cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, budget)
        got = decode(bench.model, ids, cache, bench.max_new_tokens, prefill_chunk=bench.prefill_chunk)
        if got.tokens == ref.tokens:
            kl = metrics.mean_kl(ref.logits, got.logits)
        else:
            _seed(bench.seed)
            forced_cache = _cache_for(bench.model, policy, budget)
            forced = decode(bench.model, ids, forced_cache, bench.max_new_tokens, force=ref.tokens,
                            prefill_chunk=bench.prefill_chunk)
            kl = metrics.mean_kl(ref.logits, forced.logits)
        return _sweep_record(bench, policy, budget, label, prompt, context, got, cache, ref, kl)
    except Exception as exc:  # a policy that cannot run at this budget must not stop the bench
        status, reason = _failure(exc)
        return {"policy": policy, "exact": registered()[policy].exact, "budget": budget, "budget_label": label,
                "prompt": prompt.name, "prompt_tokens": context, "status": status, "reason": reason}
    finally:
        _close(cache)
        _close(forced_cache)


def _sweep_record(bench: Bench, policy: str, budget: int | None, label: str | None, prompt: Prompt, context: int,
                  got: Decoded, cache: KVBoundCache, ref: Decoded, kl: float) -> dict[str, Any]:
    text = bench.tokenizer.decode(got.tokens, skip_special_tokens=True)
    return {
        "policy": policy,
        "exact": registered()[policy].exact,
        "budget": budget,
        "budget_label": label,
        "prompt": prompt.name,
        "prompt_tokens": context,
        "new_tokens": len(got.tokens),
        "status": "ok",
        "token_match": metrics.token_match(ref.tokens, got.tokens),
        "prefix_match": metrics.prefix_match(ref.tokens, got.tokens),
        "first_divergence": metrics.first_divergence(ref.tokens, got.tokens),
        "mean_kl": kl,
        **_memory(cache),
        "peak_rss_bytes": got.peak_rss_bytes,
        "rss_added_bytes": got.rss_added_bytes,
        "prefill_seconds": got.prefill_seconds,
        "seconds_per_token": got.seconds_per_token,
        "time_ratio_vs_full": got.seconds_per_token / ref.seconds_per_token,
        "needle_found": (prompt.answer.lower() in text.lower()) if prompt.answer else None,
        "continuation": text,
    }


# --------------------------------------------------------------------------- multiturn


def multiturn(bench: Bench, messages: list[str], turns: int, budget: int) -> None:
    """A ``turns``-turn chat per policy, one cache object per policy across all turns.

    Every policy gets the same user messages; its history holds its *own* replies (what a user of
    that policy would see), so a lossy policy's later turns can drift further from ``full``'s.
    ``reply_matches_full`` compares the reply ids at the same turn. ``rss_bytes`` is the whole
    process (model weights and earlier policies' allocator residue included).
    """
    order = [REFERENCE] + [p for p in bench.policies if p != REFERENCE]
    full_replies: list[list[int]] = []
    bar = bench.bar(len(order) * turns, "multiturn")
    try:
        for policy in order:
            _multiturn_policy(bench, policy, messages, turns, budget, full_replies, bar)
    finally:
        bar.close()


def _multiturn_policy(bench: Bench, policy: str, messages: list[str], turns: int, budget: int,
                      full_replies: list[list[int]], bar) -> None:
    spec = registered()[policy]
    used_budget = budget if spec.needs_budget else None
    summary: dict[str, Any] = {"policy": policy, "exact": spec.exact, "budget": used_budget, "status": "ok"}
    eos = bench.model.generation_config.eos_token_id
    cache = None
    done = matched = 0
    first_bad: int | None = None
    peak_total = 0
    seconds = 0.0
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, used_budget)
        conv = Conversation(bench.tokenizer, bench.device, eos)
        for turn in range(turns):
            bar.set_postfix_str(f"{policy} turn {turn + 1}")
            ids = conv.add_user(messages[turn % len(messages)])
            t0 = time.perf_counter()
            got = decode(bench.model, ids, cache, bench.max_new_tokens, stop_at_eos=True, keep_logits=False,
                         prefill_chunk=bench.prefill_chunk)
            seconds += time.perf_counter() - t0
            text = conv.add_reply(got.tokens)
            if policy == REFERENCE:
                full_replies.append(got.tokens)
            same = got.tokens == full_replies[turn]
            matched += same
            if not same and first_bad is None:
                first_bad = turn + 1
            mem = _memory(cache)
            peak_total = max(peak_total, mem["total_cache_bytes"])
            gc.collect()
            record = {"turn": turn + 1, "policy": policy, "budget": used_budget, "context_tokens": len(conv.ids),
                      "hot_kv_bytes": mem["hot_kv_bytes"], "total_cache_bytes": mem["total_cache_bytes"],
                      "bytes_by_tier": mem["bytes_by_tier"], "rss_bytes": metrics.rss_bytes(),
                      "reply_tokens": len(got.tokens), "reply_matches_full": same, "reply": text}
            bench.results.add_turn(record)
            done += 1
            bar.update()
        summary.update(_memory(cache))
    except Exception as exc:
        summary["status"], summary["reason"] = _failure(exc)
        bar.update(turns - done)
    finally:
        _close(cache)
    summary.update(turns=done, replies_matching_full=matched, first_divergent_turn=first_bad,
                   peak_total_cache_bytes=peak_total, seconds=seconds)
    bench.save_run(summary)


# --------------------------------------------------------------------------- bytes


def analytic_bytes(model) -> dict[str, int]:
    """Bytes one token costs, from the config: full K/V, per-layer residuals, layer-0 residual, token id."""
    cfg = text_config(model)
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return {
        "full_kv": kv_bytes_per_token(model),
        "per_layer_residual": cfg.num_hidden_layers * cfg.hidden_size * itemsize,
        "layer0_residual": cfg.hidden_size * itemsize,
        "token_id_int64": 8,
        "token_id_int32": 4,
    }


def bytes_per_token(bench: Bench, prompt: Prompt, budgets: list[Budget]) -> None:
    """Each policy's steady state after ``prompt`` + ``max_new_tokens``: bytes held per token, by tier."""
    bench.results.set_extra("analytic_bytes_per_token", analytic_bytes(bench.model))
    ids = encode_prompt(bench.tokenizer, prompt, bench.device)
    specs = registered()
    order = [REFERENCE] + [p for p in bench.policies if p != REFERENCE]
    jobs = [(p, b) for p in order for b in (budgets if specs[p].needs_budget else budgets[:1])]
    bar = bench.bar(len(jobs), "bytes")
    try:
        for policy, budget in jobs:
            tokens = budget.tokens(ids.shape[1]) if specs[policy].needs_budget else None
            bar.set_postfix_str(f"{policy} @ {tokens}")
            record: dict[str, Any] = {"policy": policy, "exact": specs[policy].exact, "budget": tokens,
                                      "prompt": prompt.name, "status": "ok"}
            cache = None
            try:
                _seed(bench.seed)
                cache = _cache_for(bench.model, policy, tokens)
                got = decode(bench.model, ids, cache, bench.max_new_tokens, keep_logits=False,
                             prefill_chunk=bench.prefill_chunk)
                mem = {**_memory(cache), "peak_rss_bytes": got.peak_rss_bytes, "rss_added_bytes": got.rss_added_bytes}
                seen = max(1, mem["tokens_seen"])
                record.update(mem)
                record["bytes_per_token"] = mem["total_cache_bytes"] / seen
                record["bytes_per_token_by_tier"] = {k: v / seen for k, v in mem["bytes_by_tier"].items()}
            except Exception as exc:
                record["status"], record["reason"] = _failure(exc)
            finally:
                _close(cache)
            bench.save_run(record)
            bar.update()
    finally:
        bar.close()


# --------------------------------------------------------------------------- latency


def latency(bench: Bench, lengths: list[int], batches: list[int], layer: int | None = None,
            max_bytes: int = 2 << 30, min_run_time: float = 0.2) -> None:
    """Per (cached tokens N, batch B): time *reading* one layer's cached K/V (copying both tensors
    out of the cache) against *recomputing* them from that layer's stored pre-norm residuals with
    :meth:`LayerDriver.project_kv` (norm, k/v projection, k_norm, RoPE). ``recompute_over_read`` < 1
    means recomputing is faster. Cells whose tensors would exceed ``max_bytes`` are skipped."""
    from torch.utils.benchmark import Timer

    from ..recompute import LayerDriver

    driver = LayerDriver(bench.model)
    cfg = text_config(bench.model)
    layer = cfg.num_hidden_layers // 2 if layer is None else layer
    dtype, device = bench.model.dtype, bench.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_per_token = kv_bytes_per_token(bench.model) // cfg.num_hidden_layers
    bench.results.set_extra("latency_layer", layer)
    cells = [(n, b) for n in lengths for b in batches]
    bar = bench.bar(len(cells), "latency")
    try:
        for n, b in cells:
            bar.set_postfix_str(f"N={n} B={b}")
            residual_bytes = b * n * cfg.hidden_size * itemsize
            kv_bytes = b * n * kv_per_token
            record: dict[str, Any] = {"tokens": n, "batch": b, "layer": layer, "kv_bytes": kv_bytes,
                                      "residual_bytes": residual_bytes, "status": "ok"}
            if residual_bytes + 3 * kv_bytes > max_bytes:
                record.update(status="skipped", reason=f"needs ~{(residual_bytes + 3 * kv_bytes) / 2**20:.0f} MiB "
                                                       f"of tensors (limit {max_bytes / 2**20:.0f} MiB)")
            else:
                record.update(_time_cell(driver, layer, n, b, cfg.hidden_size, dtype, device, Timer, min_run_time))
            bench.save_run(record)
            bar.update()
    finally:
        bar.close()


@torch.no_grad()
def _time_cell(driver, layer: int, n: int, b: int, hidden: int, dtype, device, Timer, min_run_time: float):
    gen = torch.Generator().manual_seed(n * 1000 + b)
    residual = torch.randn(b, n, hidden, generator=gen).to(device=device, dtype=dtype)
    positions = torch.arange(n, device=device).unsqueeze(0).expand(b, n)
    keys, values = driver.project_kv(layer, residual, positions)
    keys, values = keys.contiguous(), values.contiguous()
    env = {"driver": driver, "layer": layer, "residual": residual, "positions": positions,
           "keys": keys, "values": values, "torch": torch}
    with torch.no_grad():
        read = Timer("keys.clone(); values.clone()", globals=env).blocked_autorange(min_run_time=min_run_time)
        recompute = Timer("driver.project_kv(layer, residual, positions)", globals=env).blocked_autorange(
            min_run_time=min_run_time)
    del keys, values, residual
    return {"read_seconds": read.median, "recompute_seconds": recompute.median,
            "recompute_over_read": recompute.median / read.median}
