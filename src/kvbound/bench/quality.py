"""The quality scenarios of ``kvbound bench``: ``perplexity`` (perplexity vs budget per policy on a
long text) and ``needle`` (RULER-style retrieval accuracy per policy and budget, over context
length x needle depth). Both score through each policy's cache with :mod:`kvbound.quality` and
use ``full`` as the reference measured in the same run.

Knobs (``kvbound bench --scenario perplexity|needle --help``):

* perplexity: ``--text-file`` (default: the KJV book of Acts, :mod:`kvbound.quality.corpus`),
  ``--max-tokens`` (default 1024), ``--chunk`` (default 16), ``--budgets`` (default 32,64,128);
* needle: ``--lengths`` (default 1024,2048), ``--depths`` (default 0,0.5,1), ``--kinds``
  (default single,multikey), ``--chunk`` (prefill chunk, default 256), ``--budgets`` (default 256),
  ``--rerun-max-length`` (default 1024: ``kv-direct``, which re-runs the model over the evicted span
  every step, runs only at lengths up to it; 0 = every length).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..cache import registered
from ..cache.registry import rerunning_policies
from ..errors import KVBoundError
from ..quality import perplexity
from ..quality import needle as niah
from .inputs import Budget
from .scenarios import REFERENCE, Bench, _cache_for, _close, _failure, _memory, _seed

SCENARIOS = ("perplexity", "needle")
DEFAULT_BUDGETS = {"perplexity": "32,64,128", "needle": "256"}
DEFAULT_PPL_TOKENS = 1024
DEFAULT_CHUNK = {"perplexity": 16, "needle": 256}
DEFAULT_NEEDLE_LENGTHS = "1024,2048"
DEFAULT_DEPTHS = "0,0.5,1"
DEFAULT_KINDS = "single,multikey"
DEFAULT_RERUN_MAX_LENGTH = 1024  # kv-direct CPU time per cell: 6.7x full at 1024, 9.5x at 2048
# (benchmarks/results/needle-long; measured before kv-direct took prompts by id, which cut its prefill)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The quality scenarios' options (``--lengths`` is shared with ``latency``)."""
    g = parser.add_argument_group("perplexity and needle scenarios")
    g.add_argument("--text-file", default=None, metavar="PATH",
                   help="perplexity: text to score (default: the bundled KJV book of Acts)")
    g.add_argument("--max-tokens", type=int, default=None, metavar="N",
                   help=f"perplexity: score the first N tokens (default: {DEFAULT_PPL_TOKENS})")
    g.add_argument("--chunk", type=int, default=None, metavar="C",
                   help="tokens per forward pass: perplexity scoring chunk (default: 16; 1 = strict token by "
                        "token) / needle prompt prefill chunk (default: 256)")
    g.add_argument("--depths", default=DEFAULT_DEPTHS,
                   help=f"needle: depths of the needle, fractions in [0,1] (default: {DEFAULT_DEPTHS})")
    g.add_argument("--kinds", default=DEFAULT_KINDS,
                   help=f"needle: tasks, from {', '.join(niah.KINDS)} (default: {DEFAULT_KINDS})")
    g.add_argument("--rerun-max-length", type=int, default=DEFAULT_RERUN_MAX_LENGTH, metavar="N",
                   help="needle: run the policies that re-run the model over the whole evicted span every step "
                        f"({', '.join(rerunning_policies()) or 'none'}; their time grows with the context) only at lengths up "
                        f"to N; the report says which cells were skipped (default: {DEFAULT_RERUN_MAX_LENGTH}; "
                        "0 = every length)")


def _depths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVBoundError(f"--depths must be comma-separated fractions in [0,1], got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise KVBoundError(f"--depths must be comma-separated fractions in [0,1], got {text!r}")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in niah.KINDS]
    if not kinds or bad:
        raise KVBoundError(f"--kinds must be from {', '.join(niah.KINDS)}, got {text!r}")
    return kinds


def _chunk(args: argparse.Namespace) -> int:
    chunk = args.chunk if args.chunk is not None else DEFAULT_CHUNK[args.scenario]
    if chunk < 1:
        raise KVBoundError(f"--chunk must be >= 1 token, got {chunk}")
    return chunk


def options(args: argparse.Namespace, lengths: list[int]) -> dict[str, Any]:
    """What goes into ``meta.options`` (validated, defaults resolved)."""
    if args.scenario == "perplexity":
        tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_PPL_TOKENS
        if tokens < 2:
            raise KVBoundError(f"--max-tokens must be >= 2, got {tokens}")
        return {"text": args.text_file or f"kjv:{_corpus().DEFAULT_BOOK}", "max_tokens": tokens, "chunk": _chunk(args)}
    if args.rerun_max_length < 0:
        raise KVBoundError(f"--rerun-max-length must be >= 0 tokens (0 = every length), got {args.rerun_max_length}")
    return {"lengths": lengths, "depths": _depths(args.depths), "kinds": _kinds(args.kinds), "chunk": _chunk(args),
            "rerun_max_length": args.rerun_max_length}


def _corpus():
    from ..quality import corpus

    return corpus


PAPER_ROWS = ("kv-direct", "window")  # the KV-Direct paper's perplexity table: full, KV-Direct, window-only


def _order(policies: list[str]) -> list[str]:
    """``full``, then the paper's rows (``kv-direct``, ``window``), then the other lossy policies,
    then the other exact ones (an interrupted run keeps the paper's table first)."""
    specs = registered()
    others = [p for p in policies if p != REFERENCE]
    return [REFERENCE] + sorted(others, key=lambda p: (p not in PAPER_ROWS, PAPER_ROWS.index(p) if p in PAPER_ROWS
                                                       else 0, specs[p].exact, p))


def _jobs(policies: list[str], budgets: list[Budget]) -> list[tuple[str, Budget | None]]:
    specs = registered()
    return [(p, b) for p in _order(policies) for b in (budgets if specs[p].needs_budget else [None])]


def run(bench: Bench, args: argparse.Namespace, budgets: list[Budget], opts: dict[str, Any]) -> None:
    if args.scenario == "perplexity":
        perplexity_vs_budget(bench, budgets, opts)
    else:
        needle_grid(bench, budgets, opts)


# --------------------------------------------------------------------------- perplexity


def perplexity_ids(bench: Bench, opts: dict[str, Any]):
    from ..prompts import read_prompt_file

    name = opts["text"]
    text = _corpus().book_text(name.split(":", 1)[1]) if name.startswith("kjv:") else read_prompt_file(name, "text file")
    ids = bench.tokenizer(text, return_tensors="pt")["input_ids"][:, :opts["max_tokens"]]
    if ids.shape[1] < 2:
        raise KVBoundError(f"the text {name} is {ids.shape[1]} token(s); perplexity needs at least 2")
    return ids.to(bench.device)


def perplexity_vs_budget(bench: Bench, budgets: list[Budget], opts: dict[str, Any]) -> None:
    """Every policy x budget scores the same text with :func:`kvbound.quality.perplexity`;
    ``full`` (once, first) is the reference for ``ppl_ratio_vs_full`` and ``time_ratio_vs_full``."""
    ids = perplexity_ids(bench, opts)
    bench.results.set_extra("text_tokens", int(ids.shape[1]))
    jobs = _jobs(bench.policies if REFERENCE in bench.policies else [REFERENCE, *bench.policies], budgets)
    ref: dict[str, Any] = {}
    bar = bench.bar(len(jobs), "perplexity")
    try:
        for policy, budget in jobs:
            tokens = budget.tokens(ids.shape[1]) if budget is not None else None
            bar.set_postfix_str(f"{policy} @ {tokens}")
            record = _perplexity_one(bench, policy, tokens, budget, ids, opts["chunk"], ref)
            if policy == REFERENCE and record["status"] == "ok":
                ref = record
            bench.save_run(record)
            bar.update()
    finally:
        bar.close()


def _perplexity_one(bench: Bench, policy: str, tokens: int | None, budget: Budget | None, ids, chunk: int,
                    ref: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"policy": policy, "exact": registered()[policy].exact, "budget": tokens,
                              "budget_label": budget.label if budget is not None else None, "status": "ok"}
    cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, tokens)
        cpu = time.process_time()
        got = perplexity(bench.model, ids, cache, chunk=chunk)
        record.update(got.as_dict(), cpu_seconds=time.process_time() - cpu)
        record.update(_memory(cache))
        if ref:
            record["ppl_ratio_vs_full"] = got.perplexity / ref["perplexity"]
            record["time_ratio_vs_full"] = got.seconds / ref["seconds"]
    except Exception as exc:  # a policy that cannot run at this budget must not stop the bench
        record["status"], record["reason"] = _failure(exc)
    finally:
        _close(cache)
    return record


# --------------------------------------------------------------------------- needle


def needle_grid(bench: Bench, budgets: list[Budget], opts: dict[str, Any]) -> None:
    """For every task (kind x length x depth): ``full`` first, then every policy x budget, each
    answering greedily through its own fresh cache; ``same_as_full`` compares hit/miss with full's."""
    from ..generation import max_positions

    limit = max_positions(bench.model)
    too_long = [n for n in opts["lengths"] if limit is not None and n > limit]
    if too_long:
        raise KVBoundError(f"needle length {too_long[0]} is beyond the model's {limit} positions; "
                           f"use --lengths up to {limit}")
    tasks = [niah.make_task(bench.tokenizer, length, depth, kind, seed=bench.seed)
             for kind in opts["kinds"] for length in opts["lengths"] for depth in opts["depths"]]
    jobs = _jobs(bench.policies if REFERENCE in bench.policies else [REFERENCE, *bench.policies], budgets)
    cap, slow = opts.get("rerun_max_length", 0), set(rerunning_policies())
    cells = [(task, [(p, b) for p, b in jobs if not (cap and p in slow and task.length > cap)]) for task in tasks]
    bar = bench.bar(sum(len(j) for _, j in cells), "needle")
    try:
        for task, task_jobs in cells:
            full = {}
            for policy, budget in task_jobs:
                tokens = budget.tokens(task.tokens) if budget is not None else None
                bar.set_postfix_str(f"{task.kind} {task.length}@{task.depth:g}: {policy} @ {tokens}")
                record = _needle_one(bench, policy, tokens, budget, task, opts["chunk"])
                if policy == REFERENCE and record["status"] == "ok":
                    full = record
                if record["status"] == "ok" and full:
                    record["same_as_full"] = record["found"] == full["found"]
                    record["answer_matches_full"] = record["answer"] == full["answer"]
                bench.save_run(record)
                bar.update()
    finally:
        bar.close()


def _needle_one(bench: Bench, policy: str, tokens: int | None, budget: Budget | None, task: niah.NeedleTask,
                chunk: int) -> dict[str, Any]:
    record: dict[str, Any] = {"policy": policy, "exact": registered()[policy].exact, "budget": tokens,
                              "budget_label": budget.label if budget is not None else None, "kind": task.kind,
                              "length": task.length, "prompt_tokens": task.tokens, "depth": task.depth,
                              "value": task.value, "status": "ok"}
    cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, tokens)
        cpu = time.process_time()
        got = niah.run_task(bench.model, bench.tokenizer, task, cache, prefill_chunk=chunk,
                            max_new_tokens=bench.max_new_tokens or None)
        record.update(found=got.found, answer=got.answer, seconds=got.seconds, cpu_seconds=time.process_time() - cpu,
                      peak_hot_kv_bytes=cache.peak_hot_kv_bytes, total_cache_bytes=_memory(cache)["total_cache_bytes"])
    except Exception as exc:
        record["status"], record["reason"] = _failure(exc)
    finally:
        _close(cache)
    return record
