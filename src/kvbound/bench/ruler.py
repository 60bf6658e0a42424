"""``kvbound bench --scenario ruler``: RULER's synthetic tasks (:mod:`kvbound.quality.ruler_tasks`) scored
per policy and compression ratio, under one of two protocols.

* ``--protocol compress`` (kvpress's, the field's leaderboards): the context is prefilled once per
  sample through :class:`~kvbound.cache.context.ContextRecorder` (full attention, recording the
  window queries and the accumulated attention the scorers need); each eviction policy then
  compresses its own copy to ``keep = round((1 - ratio) * context tokens)`` per layer and head
  (:meth:`~kvbound.cache.evicting.EvictingCache.compress`), and the question and answer prefix are
  appended uncompressed (at positions after the context) and answered greedily. ``full`` is the
  recorder itself, continued with the question (it holds every token).
* ``--protocol bounded`` (a memory-bounded user's): each policy runs with budget ``keep`` from the
  first prefill chunk on (``--prefill-chunk`` tokens per pass), then the question, then the answer.

Both feed the context in the same chunks and the question as one pass, so ``full`` is the same
computation under both. Exact policies (``kv-direct``, ``residual``, ``offload``) equal ``full`` at any
budget: they run once per sample, bounded at the smallest ``keep``, and the record says whether their
answer is token-identical to ``full``'s (a fresh bounded ``full`` run).

Scores are RULER's ``string_match_all`` in [0, 1] (RULER reports x100). Each run records its answer,
the K/V bytes the policy held after the context, and the process's peak RSS during the run
(``peak_rss_bytes``; ``rss_added_bytes`` above the RSS at its start). Report: :mod:`kvbound.bench.ruler_report`.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

import torch

from ..cache import make_cache, registered
from ..cache.context import ContextRecorder
from ..cache.evicting import EvictingCache
from ..errors import KVBoundError
from ..generation import max_positions, prefill
from ..generation import greedy
from ..quality import ruler_tasks as rt
from ..rss import current_rss_bytes, peak_rss_bytes, reset_peak_rss
from .runner import REFERENCE, Bench, _failure, _memory, policy_name, policy_options, positive_ints, spec

PROTOCOLS = ("compress", "bounded")
DEFAULT_RATIOS = "0.25,0.5,0.75,0.875"
DEFAULT_LENGTHS = "4096"
DEFAULT_SAMPLES = 6  # per task: 11 tasks x 6 = 66 samples
ANSWER_MODES = ("batched", "alone")
ANSWER_ROWS = 64  # compressed copies answering in one packed pass (each pass reads the weights once for all)
QUICK_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "vt")


def default_policies() -> list[str]:
    """``full`` and every registered eviction policy that takes a token budget (those that can run
    both protocols; ``think`` alone keeps every token)."""
    return [REFERENCE] + [p for p, spec in registered().items()
                          if not spec.exact and spec.needs_budget and issubclass(spec.build, EvictingCache)
                          and spec.build.compresses]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ruler scenario's options (``--lengths``, ``--policies``, ``--prefill-chunk`` are shared)."""
    g = parser  # the argument group kvbound bench gives each scenario
    g.add_argument("--protocol", choices=PROTOCOLS, default="compress",
                   help="ruler: compress = prefill the context, compress it to the ratio, then ask (kvpress's "
                        "protocol); bounded = the policy holds its budget from the first prefill chunk "
                        "(default: compress)")
    g.add_argument("--tasks", default=None,
                   help=f"ruler: comma-separated tasks from {', '.join(rt.TASKS)} (default: all; --quick: "
                        f"{','.join(QUICK_TASKS)})")
    g.add_argument("--ratios", default=DEFAULT_RATIOS,
                   help=f"ruler: compression ratios, the fraction of the context removed, in [0,1) "
                        f"(default: {DEFAULT_RATIOS})")
    g.add_argument("--samples", type=int, default=None, metavar="N",
                   help=f"ruler: samples per task (default: {DEFAULT_SAMPLES}; --quick: 1)")
    g.add_argument("--first-sample", type=int, default=0, metavar="K",
                   help="ruler: index of each task's first sample (default: 0); samples K..K+N-1 extend a "
                        "board run with samples 0..K-1, and `kvbound bench merge` joins them")
    g.add_argument("--answers", choices=ANSWER_MODES, default="batched",
                   help="ruler (compress): batched = every compressed copy of a sample answers in shared forward "
                        f"passes, up to {ANSWER_ROWS} rows (kvbound.batching; a policy that cannot batch answers "
                        "alone); alone = one answer at a time, each with its own peak RSS (default: batched)")
    g.add_argument("--quick", action="store_true",
                   help=f"ruler: {len(QUICK_TASKS)} tasks, 1 sample each")


def _ratios(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVBoundError(f"--ratios must be comma-separated fractions in [0, 1), got {text!r}") from None
    bad = [v for v in values if not 0.0 <= v < 1.0]
    if not values or bad:
        raise KVBoundError(f"--ratios must be fractions in [0, 1) (the share of the context removed), got {text!r}")
    return sorted(set(values))


def _tasks(text: str | None, quick: bool) -> list[str]:
    if text is None:
        return list(QUICK_TASKS if quick else rt.TASKS)
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    for task in tasks or [""]:
        rt.check_task(task)
    return list(dict.fromkeys(tasks))


def check_policies(policies: list[str], protocol: str) -> None:
    """Refuse a lossy policy that cannot compress a prefilled context under ``compress``."""
    if protocol != "compress":
        return
    for p in policies:
        build = spec(p).build
        if not spec(p).exact and not (issubclass(build, EvictingCache) and build.compresses):
            raise KVBoundError(f"policy {p!r} cannot run --protocol compress (it does not evict tokens from a "
                               "prefilled context); it supports --protocol bounded")
        if policy_options(p).get("allocation") == "cake":
            raise KVBoundError(f"policy {p!r} cannot run --protocol compress (CAKE sets each layer's share while "
                               "prefilling); it supports --protocol bounded")


def options(args: argparse.Namespace, policies: list[str], model=None) -> dict[str, Any]:
    """Validated options (``meta.options``); ``model`` checks the lengths against its positions."""
    if args.samples is not None and args.samples < 1:
        raise KVBoundError(f"--samples must be >= 1, got {args.samples}")
    first = getattr(args, "first_sample", 0)
    if first < 0:
        raise KVBoundError(f"--first-sample must be >= 0, got {first}")
    tasks = _tasks(args.tasks, args.quick)
    lengths = positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths")
    if REFERENCE not in policies:
        policies = [REFERENCE, *policies]
    check_policies(policies, args.protocol)
    limit = max_positions(model) if model is not None else None
    if limit is not None:
        longest = max(rt.ANSWER_TOKENS[t] for t in tasks)
        for n in lengths:
            if n + longest > limit:
                raise KVBoundError(f"--lengths {n} is past the model's {limit} positions (with {longest} answer "
                                   f"tokens); use at most {limit - longest}")
    return {"protocol": args.protocol, "tasks": tasks, "lengths": lengths, "ratios": _ratios(args.ratios),
            "samples": args.samples or (1 if args.quick else DEFAULT_SAMPLES), "first_sample": first,
            "policies": policies,
            "prefill_chunk": args.prefill_chunk, "quick": args.quick, "max_new_tokens": args.max_new_tokens,
            "answers": getattr(args, "answers", "batched")}


def keep_for(ratio: float, context_tokens: int) -> int:
    """Tokens kept per layer and head at ``ratio`` (the fraction removed)."""
    return max(1, round((1.0 - ratio) * context_tokens))


# --------------------------------------------------------------------------- runs


def _answer(bench: Bench, sample: rt.RulerSample, cache) -> tuple[list[int], str]:
    ids = sample.input_ids.to(bench.device)
    new = greedy(bench.model, ids, cache, sample.max_new_tokens, stop_at_eos=True, prefill_chunk=bench.prefill_chunk)
    tokens = new[0].tolist()
    return tokens, bench.tokenizer.decode(tokens, skip_special_tokens=True)


def _record(bench: Bench, sample: rt.RulerSample, protocol: str, policy: str, ratio: float | None,
            keep: int | None, run, **extra: Any) -> dict[str, Any]:
    """Run ``run() -> (cache, tokens, answer)`` with RSS watched; save and return its record."""
    record = {**_base_record(sample, protocol, policy, ratio, keep), **extra}
    reset_peak_rss()
    rss0, start = current_rss_bytes(), time.perf_counter()
    try:
        cache, tokens, answer, held = run()
    except (KVBoundError, RuntimeError, ValueError) as exc:
        record["status"], record["reason"] = _failure(exc)
        bench.save_run(record)
        return record
    record.update(seconds=round(time.perf_counter() - start, 3), peak_rss_bytes=peak_rss_bytes(),
                  rss_added_bytes=max(0, peak_rss_bytes() - rss0), held_kv_bytes=held)
    _save_answer(bench, sample, record, cache, tokens, answer)
    return record


def _bounded(bench: Bench, sample: rt.RulerSample, policy: str, keep: int | None):
    def run():
        cache = make_cache(bench.model, policy_name(policy), keep, **policy_options(policy))
        prefill(bench.model, torch.tensor([sample.context_ids], device=bench.device), cache, bench.prefill_chunk)
        held = cache.bytes_by_tier().get("hot_kv", 0)
        return (cache, *_answer(bench, sample, cache), held)

    return run


def _compressed(bench: Bench, sample: rt.RulerSample, policy: str, keep: int, context: ContextRecorder):
    def run():
        cache = make_cache(bench.model, policy_name(policy), keep, **policy_options(policy))
        cache.compress(context, keep)
        held = cache.bytes_by_tier().get("hot_kv", 0)
        return (cache, *_answer(bench, sample, cache), held)

    return run


def _batched_answers(bench: Bench, sample: rt.RulerSample, protocol: str, cells: list[tuple[str, float]],
                     context: ContextRecorder, bar) -> None:
    """Compress one copy of ``context`` per ``(policy, ratio)`` cell, then answer the question with
    every copy that can share a forward pass (:func:`kvbound.batching.greedy_rows`, up to
    :data:`ANSWER_ROWS` at a time); the others answer alone. A batched record's ``rss_added_bytes``
    and ``compress_seconds`` are its compression's own; its ``seconds`` add its share of the batch's
    answer time, and ``peak_rss_bytes`` is left out (the batch's peak is in ``answer_batches``)."""
    from ..batching import batch_refusal, greedy_rows

    eos = bench.model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ready = []
    for policy, ratio in cells:
        keep = keep_for(ratio, len(sample.context_ids))
        record = _compressed_cell(bench, sample, protocol, policy, ratio, keep, context)
        if record is None:
            bar.update(1)
            continue
        cache = record.pop("_cache")
        if batch_refusal(cache) is None:
            ready.append((record, cache))
        else:  # answers alone, its RSS measured as in --answers alone
            record["answered_with"] = 1
            _finish(bench, sample, record, cache, lambda c=cache: _answer(bench, sample, c))
            bar.update(1)
    ids = sample.input_ids[0].tolist()
    for start in range(0, len(ready), ANSWER_ROWS):
        group = ready[start:start + ANSWER_ROWS]
        reset_peak_rss()
        rss0, t0 = current_rss_bytes(), time.perf_counter()
        try:
            replies = greedy_rows(bench.model, [c for _, c in group], [ids[c.get_seq_length():] for _, c in group],
                                  [sample.max_new_tokens] * len(group), eos)
        except (KVBoundError, RuntimeError, ValueError) as exc:
            for record, cache in group:
                record["status"], record["reason"] = _failure(exc)
                cache.close()
                bench.save_run(record)
            bar.update(len(group))
            continue
        seconds = time.perf_counter() - t0
        batches = bench.results.data["extra"].setdefault("answer_batches", [])
        batches.append({"task": sample.task, "sample": sample.index, "length": sample.length, "rows": len(group),
                        "seconds": round(seconds, 3), "peak_rss_bytes": peak_rss_bytes(),
                        "rss_added_bytes": max(0, peak_rss_bytes() - rss0)})
        for (record, cache), tokens in zip(group, replies):
            record["answered_with"] = len(group)
            record["seconds"] = round(record["compress_seconds"] + seconds / len(group), 3)
            _finish(bench, sample, record, cache, lambda t=tokens: (t, bench.tokenizer.decode(t, skip_special_tokens=True)))
        bar.update(len(group))


def _compressed_cell(bench: Bench, sample: rt.RulerSample, protocol: str, policy: str, ratio: float, keep: int,
                     context: ContextRecorder) -> dict[str, Any] | None:
    """A record for one cell with its compressed cache under ``"_cache"`` (``None``: it failed, saved)."""
    record = _base_record(sample, protocol, policy, ratio, keep)
    reset_peak_rss()
    rss0, start = current_rss_bytes(), time.perf_counter()
    try:
        cache = make_cache(bench.model, policy_name(policy), keep, **policy_options(policy))
        cache.compress(context, keep)
    except (KVBoundError, RuntimeError, ValueError) as exc:
        record["status"], record["reason"] = _failure(exc)
        bench.save_run(record)
        return None
    record.update(compress_seconds=round(time.perf_counter() - start, 3), rss_added_bytes=max(0, peak_rss_bytes() - rss0),
                  held_kv_bytes=cache.bytes_by_tier().get("hot_kv", 0), _cache=cache)
    return record


def _finish(bench: Bench, sample: rt.RulerSample, record: dict[str, Any], cache, answer) -> None:
    """Score ``answer() -> (tokens, text)`` into ``record`` (timed and RSS-watched when it answers alone), save it."""
    alone = record.get("answered_with") == 1
    if alone:
        reset_peak_rss()
        rss0, start = current_rss_bytes(), time.perf_counter()
    try:
        tokens, text = answer()
    except (KVBoundError, RuntimeError, ValueError) as exc:
        record["status"], record["reason"] = _failure(exc)
        cache.close()
        bench.save_run(record)
        return
    if alone:
        record.update(seconds=round(record["compress_seconds"] + time.perf_counter() - start, 3),
                      peak_rss_bytes=peak_rss_bytes(),
                      rss_added_bytes=max(record["rss_added_bytes"], peak_rss_bytes() - rss0))
    _save_answer(bench, sample, record, cache, tokens, text)


def _base_record(sample: rt.RulerSample, protocol: str, policy: str, ratio: float | None,
                 keep: int | None) -> dict[str, Any]:
    """The fields every run record of ``sample`` starts with."""
    return {"protocol": protocol, "task": sample.task, "length": sample.length, "sample": sample.index,
            "policy": policy, "ratio": ratio, "keep": keep, "context_tokens": len(sample.context_ids),
            "tokens": sample.tokens, "references": list(sample.references)}


def _save_answer(bench: Bench, sample: rt.RulerSample, record: dict[str, Any], cache, tokens: list[int],
                 text: str) -> None:
    """Score the answer into ``record``, add the cache's memory, close the cache and save the record."""
    record.update(status="ok", answer=text, answer_tokens=tokens, score=rt.score(text, sample.references),
                  **_memory(cache))
    cache.close()
    bench.save_run(record)


def _exact_checks(bench: Bench, sample: rt.RulerSample, protocol: str, exact: list[str], keep: int,
                  full_tokens: list[int] | None) -> None:
    """Each exact policy once, bounded at ``keep``, against a bounded ``full`` (``full_tokens`` or a fresh run)."""
    if not exact:
        return
    if full_tokens is None:
        ref = _record(bench, sample, protocol, REFERENCE, None, None, _bounded(bench, sample, REFERENCE, None),
                      role="exactness reference (bounded full)")
        full_tokens = ref.get("answer_tokens")
    for policy in exact:
        rec = _record(bench, sample, protocol, policy, None, keep, _bounded(bench, sample, policy, keep),
                      role="exact check", compare_to=REFERENCE)
        if rec.get("status") == "ok" and full_tokens is not None:
            rec["identical_to_full"] = rec["answer_tokens"] == full_tokens
            bench.results.save()


def run(bench: Bench, opts: dict[str, Any]) -> None:
    """Every sample x policy x ratio of ``opts`` (see :func:`options`)."""
    policies = opts["policies"]
    lossy = [p for p in policies if not spec(p).exact]
    exact = [p for p in policies if spec(p).exact and p != REFERENCE]
    ratios, protocol = opts["ratios"], opts["protocol"]
    samples = [s for n in opts["lengths"] for s in rt.make_samples(bench.tokenizer, opts["tasks"], n, opts["samples"],
                                                                 bench.seed, opts.get("first_sample", 0))]
    if opts.get("max_new_tokens"):  # --max-new-tokens caps each task's answer length
        samples = [replace(s, max_new_tokens=min(s.max_new_tokens, opts["max_new_tokens"])) for s in samples]
    for policy in dict.fromkeys(policy_name(p) for p in policies):  # once-per-model set-up, before any measure
        spec(policy).build.prepare(bench.model)
    bar = bench.bar(len(samples) * (1 + len(lossy) * len(ratios) + len(exact)), f"ruler ({protocol})")
    prefills = []
    for sample in samples:
        n_ctx = len(sample.context_ids)
        min_keep = keep_for(max(ratios), n_ctx)
        bar.set_postfix_str(f"{sample.task} #{sample.index} at {sample.length}")
        if protocol == "compress":
            # expected-attention's statistics need every context token's attention input (kept only then)
            context = ContextRecorder(bench.model, inputs=any(policy_name(p) == "expected-attention" for p in lossy))
            start = time.perf_counter()
            prefill(bench.model, torch.tensor([sample.context_ids], device=bench.device), context, bench.prefill_chunk)
            prefills.append({"task": sample.task, "sample": sample.index, "length": sample.length,
                             "context_tokens": n_ctx, "seconds": round(time.perf_counter() - start, 3)})
            bench.results.set_extra("shared_prefills", prefills)
            cells = [(policy, ratio) for policy in lossy for ratio in ratios]
            if opts.get("answers", "batched") == "batched":
                _batched_answers(bench, sample, protocol, cells, context, bar)
            else:
                for policy, ratio in cells:
                    keep = keep_for(ratio, n_ctx)
                    _record(bench, sample, protocol, policy, ratio, keep, _compressed(bench, sample, policy, keep, context))
                    bar.update(1)

            def continue_full():  # the recorder holds every token: continued with the question it is full
                held = context.bytes_by_tier().get("hot_kv", 0)
                return (context, *_answer(bench, sample, context), held)

            _record(bench, sample, protocol, REFERENCE, None, None, continue_full)
            bar.update(1)
            _exact_checks(bench, sample, protocol, exact, min_keep, None)
        else:
            full = _record(bench, sample, protocol, REFERENCE, None, None, _bounded(bench, sample, REFERENCE, None))
            bar.update(1)
            for policy in lossy:
                for ratio in ratios:
                    keep = keep_for(ratio, n_ctx)
                    _record(bench, sample, protocol, policy, ratio, keep, _bounded(bench, sample, policy, keep))
                    bar.update(1)
            _exact_checks(bench, sample, protocol, exact, min_keep, full.get("answer_tokens"))
        bar.update(len(exact))
    bar.close()
