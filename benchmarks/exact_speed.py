"""Exact and fast? Decode speed of the exact bounded-memory policies on SmolLM2, with and without
self-speculative decoding (:mod:`kvbound.speculative`).

For each context (default ~550 and ~2000 tokens) and budget (10% and 25% of the context), every
registered exact policy but ``full`` (``offload``, ``kv-direct``... pick with ``--policies``) runs
plain greedy and speculative greedy (``--k`` drafts by a ``--draft`` cache at the budget). All
timings are decode-only (the prompt minus its last token is prefilled untimed; timing starts at
the last prompt token) and are divided by ``full``'s time/token measured in the same run, at
the same context, just before. Times are the process's CPU time (``time.process_time``) with one
torch thread by default, so other load on a shared machine does not skew the ratios (wall
times are kept in the JSON). Every run's tokens are checked against ``full``'s.

Slow configurations stop after ``--max-seconds`` (at least ``--min-new`` tokens): the row says
how many tokens were measured. Where the time goes: draft vs verification time, and the
offload store's read-back time (wrapped per cache instance).

Usage: ``python benchmarks/exact_speed.py [--contexts 550 2000] [--budgets 0.1 0.25] [--new 64]
[--k 4] [--draft window] [--threads 1] [--out benchmarks/results/exact_speed]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from importlib.resources import files
from pathlib import Path

import torch

import kvbound
from kvbound import models
from kvbound.cache.registry import registered
from kvbound.speculative import speculative_greedy


def prompt_ids(tok, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the built-in passages (repeated if needed)."""
    folder = files("kvbound") / "data" / "prompts"
    text = "\n\n".join(p.read_text() for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".txt"))
    ids = tok(text, return_tensors="pt").input_ids
    reps = -(-n // ids.shape[1])
    return ids.repeat(1, reps)[:, :n]


class ReadTimer:
    """Adds up the CPU time this cache's layers spend in ``recall`` (offload store reads)."""

    def __init__(self, cache) -> None:
        self.seconds = 0.0
        for layer in cache.layers:
            inner = layer.recall

            def timed(*args, _inner=inner):
                t0 = time.process_time()
                out = _inner(*args)
                self.seconds += time.process_time() - t0
                return out

            layer.recall = timed


def prefilled(model, ids: torch.Tensor, policy: str, budget: int | None):
    cache = kvbound.make_cache(model, policy, budget)
    with torch.inference_mode():
        model(ids[:, :-1], past_key_values=cache)
    return cache


def memory(cache) -> dict:
    report = cache.memory_report()
    tiers = report["bytes_by_tier"]
    return {"peak_hot_kv_bytes": report["peak_hot_kv_bytes"], "offloaded_bytes": tiers.get("offloaded", 0),
            "checkpoint_bytes": tiers.get("checkpoints", 0), "peak_transient_bytes": report["peak_transient_bytes"]}


def plain(model, ids, policy, budget, args) -> dict:
    """Greedy with 1-token steps, timed from the last prompt token."""
    cache = prefilled(model, ids, policy, budget)
    reads = ReadTimer(cache) if policy == "offload" else None
    tok, out = ids[:, -1:], []
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        while len(out) < args.new:
            tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            out.append(int(tok))
            if len(out) >= args.min_new and time.perf_counter() - t0 > args.max_seconds:
                break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"tokens": out, "seconds": seconds, "cpu_seconds": cpu, **memory(cache)}
    if reads:
        row["read_seconds"] = reads.seconds
    cache.close()
    return row


def speculative(model, ids, policy, budget, args, chunk: int) -> dict:
    """Speculative greedy, in calls of ``chunk`` tokens so slow runs can stop early."""
    cache = prefilled(model, ids, policy, budget)
    reads = ReadTimer(cache) if policy == "offload" else None
    out: list[int] = []
    totals = {"verifications": 0, "drafted": 0, "accepted": 0, "draft_seconds": 0.0, "verify_seconds": 0.0}
    draft_peak, margin = 0, float("inf")
    t0, c0 = time.perf_counter(), time.process_time()
    while len(out) < args.new:
        seq = torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], dim=1) if out else ids
        new, stats = speculative_greedy(model, seq, cache, draft=args.draft, budget=budget, k=args.k,
                                        max_new_tokens=min(chunk, args.new - len(out)))
        out += new[0].tolist()
        for key in totals:
            totals[key] += getattr(stats, key)
        draft_peak, margin = max(draft_peak, stats.draft_peak_hot_kv_bytes), min(margin, stats.min_margin)
        if len(out) >= args.min_new and time.perf_counter() - t0 > args.max_seconds:
            break
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    row = {"tokens": out, "seconds": seconds, "cpu_seconds": cpu, **memory(cache), **totals, "draft_peak_hot_kv_bytes": draft_peak,
           "min_margin": margin,
           "mean_accepted": totals["accepted"] / max(1, totals["verifications"]),
           "draft_time_share": totals["draft_seconds"] / max(1e-9, seconds)}
    if reads:
        row["read_seconds"] = reads.seconds
    cache.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[550, 2000])
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.10, 0.25], help="fractions of the context")
    parser.add_argument("--policies", nargs="+", default=None, help="exact policies (default: all registered but full)")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draft", default="streaming")
    parser.add_argument("--chunk", type=int, default=16,
                        help="speculative tokens per call for policies > 3x full (time checks between calls)")
    parser.add_argument("--max-seconds", type=float, default=90.0)
    parser.add_argument("--min-new", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default="benchmarks/results/exact_speed")
    parser.add_argument("--combine", nargs="+", metavar="JSON", help="only merge earlier runs' JSON into --out")
    args = parser.parse_args()
    if args.combine:
        runs = [json.loads(Path(p).read_text()) for p in args.combine]
        meta = {**runs[0]["meta"], "time": " / ".join(r["meta"]["time"] for r in runs)}
        write(Path(args.out), meta, [row for r in runs for row in r["rows"]])
        return
    torch.set_num_threads(args.threads)
    policies = args.policies or [name for name, spec in registered().items() if spec.exact and name != "full"]
    model, tok = models.load(args.model)

    rows = []
    for ctx in args.contexts:
        ids = prompt_ids(tok, ctx)
        ref = plain(model, ids, "full", None, args)
        full_tpt = ref["cpu_seconds"] / len(ref["tokens"])
        rows.append({"context": ctx, "budget": None, "policy": "full", "speculate": None,
                     **{k: v for k, v in ref.items() if k != "tokens"}, "n": len(ref["tokens"]),
                     "s_per_token": full_tpt, "ratio": 1.0, "identical": True})
        print(f"ctx {ctx}: full {full_tpt * 1e3:.1f} ms/token", flush=True)
        for frac in args.budgets:
            budget = max(1, round(frac * ctx))
            for policy in policies:
                slow = False
                for spec in (None, args.k):
                    if spec is None:
                        run = plain(model, ids, policy, budget, args)
                    else:  # slow policies run in chunks so they can stop after --max-seconds
                        run = speculative(model, ids, policy, budget, args, args.chunk if slow else args.new)
                    n = len(run["tokens"])
                    tpt = run["cpu_seconds"] / n
                    row = {"context": ctx, "budget": budget, "budget_frac": frac, "policy": policy, "speculate": spec,
                           **{k: v for k, v in run.items() if k != "tokens"}, "n": n, "s_per_token": tpt,
                           "ratio": tpt / full_tpt, "identical": run["tokens"] == ref["tokens"][:n]}
                    rows.append(row)
                    slow = row["ratio"] > 3
                    print(f"ctx {ctx} budget {budget} {policy}{' +spec k=' + str(spec) if spec else ''}: "
                          f"{tpt * 1e3:.1f} ms/token = {row['ratio']:.2f}x full over {n} tokens, "
                          f"identical={row['identical']}"
                          + (f", mean accepted {row['mean_accepted']:.2f}" if spec else ""), flush=True)

    meta = {"model": args.model, "threads": args.threads, "new": args.new, "k": args.k, "draft": args.draft,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    write(Path(args.out), meta, rows)


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(render(meta, rows))
    print(f"wrote {out.with_suffix('.md')} and .json")


def mib(b) -> str:
    return f"{b / 2**20:.2f}"


def render(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Exact decoding speed: offload / kv-direct, with and without self-speculation",
        "",
        f"`python benchmarks/exact_speed.py` -- {meta['model']}, fp32, {meta['threads']} torch thread(s), "
        f"{meta['new']} new tokens, speculation k={meta['k']} with a `{meta['draft']}` draft at the budget; "
        f"{meta['machine']}, torch {meta['torch']}, {meta['time']}.",
        "",
        "Ratio = decode CPU time/token divided by `full`'s, measured in the same run at the same context "
        "(CPU time of the process, 1 thread: robust to other load on the machine). "
        "`n` = tokens timed (slow rows stop early). `identical` = same tokens as `full`. "
        "Bytes in MiB: peak hot K/V (exact cache; the draft holds at most as much again), offload store, "
        "peak transient (read-back / rebuild buffers + the concatenation handed to attention).",
        "",
        "| context | budget | policy | ratio to full | CPU ms/token | n | mean accepted | draft share (wall) | store read share "
        "| hot K/V | offloaded | transient | identical |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        name = r["policy"] + (f" + spec k={r['speculate']}" if r["speculate"] else "")
        budget = "-" if r["budget"] is None else f"{r['budget']} ({r['budget_frac']:.0%})"
        acc = f"{r['mean_accepted']:.2f}" if r["speculate"] else "-"
        share = f"{r['draft_time_share']:.0%}" if r["speculate"] else "-"
        read = f"{r['read_seconds'] / r['cpu_seconds']:.0%}" if "read_seconds" in r else "-"
        lines.append(f"| {r['context']} | {budget} | {name} | {r['ratio']:.2f}x | {r['s_per_token'] * 1e3:.0f} | {r['n']} "
                     f"| {acc} | {share} | {read} | {mib(r['peak_hot_kv_bytes'])} | {mib(r['offloaded_bytes'])} "
                     f"| {mib(r['peak_transient_bytes'])} | {r['identical']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
