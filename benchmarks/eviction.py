"""Lossy eviction baselines vs ``full`` on a real model: greedy token match and time per token.

For every budget and policy (window, streaming, h2o, tova, snapkv) the same prompt is prefilled
and ``--new`` tokens are greedy-decoded token by token through the cache. Reported per run:

* match -- fraction of the new tokens equal to ``full``'s at the same index; ``first diff`` --
  index of the first differing token (``-`` if none);
* decode time per token as a ratio to ``full`` and to ``window`` (the cost of attention
  scoring). The machine is shared, so decode time is measured round-robin: after the match
  runs, every cache of the budget (``full`` included) decodes ``--steps`` more tokens in turn,
  ``--rounds`` times, and the fastest round per policy counts. Prefill ratios are single runs;
* peak hot K/V bytes and the policy's other tiers (scores, stored queries, positions).

Usage: ``python benchmarks/eviction.py [--budgets 32 64 128] [--new 64] [--threads 1] [--out PATH]``
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

import kvbound
from kvbound import models

POLICIES = ["window", "streaming", "h2o", "tova", "snapkv"]
DEFAULT_PROMPT = Path(kvbound.__file__).parent / "data" / "prompts" / "canals.txt"


@torch.no_grad()
def run(model, ids: torch.Tensor, cache, new: int) -> dict:
    """Prefill (timed), then decode ``new`` tokens greedily one at a time."""
    t0 = time.perf_counter()
    logits = model(ids, past_key_values=cache, use_cache=True).logits
    prefill_s = time.perf_counter() - t0
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(new - 1):
        logits = model(torch.tensor([[tokens[-1]]]), past_key_values=cache, use_cache=True).logits
        tokens.append(int(logits[0, -1].argmax()))
    report = cache.memory_report()
    return {"cache": cache, "tokens": tokens, "prefill_s": prefill_s, "peak_hot": report["peak_hot_kv_bytes"],
            "other": {k: v for k, v in report["bytes_by_tier"].items() if k != "hot_kv"}}


@torch.no_grad()
def decode_seconds(model, cache, last: int, steps: int) -> tuple[float, int]:
    """Seconds per token for ``steps`` more greedy steps on ``cache``; returns (s/token, last token)."""
    t0 = time.perf_counter()
    for _ in range(steps):
        last = int(model(torch.tensor([[last]]), past_key_values=cache, use_cache=True).logits[0, -1].argmax())
    return (time.perf_counter() - t0) / steps, last


def timed_round_robin(model, results: dict, steps: int, rounds: int) -> dict[str, float]:
    """Fastest decode s/token per policy, the policies taking turns so load changes hit them alike."""
    last = {p: r["tokens"][-1] for p, r in results.items()}
    best = {p: float("inf") for p in results}
    for _ in range(rounds):
        for p, r in results.items():
            sec, last[p] = decode_seconds(model, r["cache"], last[p], steps)
            best[p] = min(best[p], sec)
    return best


def kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-file", type=Path, default=DEFAULT_PROMPT)
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="decode steps per timing round")
    ap.add_argument("--rounds", type=int, default=4, help="timing rounds (fastest counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eviction.md")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = models.load(args.model)
    ids = tok(args.prompt_file.read_text(), return_tensors="pt").input_ids
    run(model, ids[:, :32], kvbound.make_cache(model, "full"), 4)  # warm-up

    rows = []
    for budget in args.budgets:
        results = {"full": run(model, ids, kvbound.make_cache(model, "full"), args.new)}
        results.update({p: run(model, ids, kvbound.make_cache(model, p, budget), args.new) for p in POLICIES})
        dec = timed_round_robin(model, results, args.steps, args.rounds)
        full = results["full"]
        for policy, r in results.items():
            same = [a == b for a, b in zip(r["tokens"], full["tokens"])]
            first = next((i for i, s in enumerate(same) if not s), None)
            other = ", ".join(f"{k} {kib(v)}" for k, v in sorted(r["other"].items()) if v) or "-"
            if policy == "full":
                other = f"decode {dec['full'] * 1000:.0f} ms/token, prefill {full['prefill_s']:.1f} s"
            rows.append([
                str(budget), policy, f"{sum(same) / len(same):.2f}", "-" if first is None else str(first),
                f"{r['prefill_s'] / full['prefill_s']:.2f}", f"{dec[policy] / dec['full']:.2f}",
                f"{dec[policy] / dec['window']:.2f}", kib(r["peak_hot"]), other,
            ])
            print(" | ".join(rows[-1]), flush=True)
        del results

    head = ["budget", "policy", "match vs full", "first diff", "prefill / full", "decode / full",
            "decode / window", "peak hot K/V", "other tiers"]
    lines = [
        "# Lossy eviction baselines vs full",
        "",
        f"Model `{args.model}`, prompt `{args.prompt_file.name}` ({ids.shape[1]} tokens), {args.new} greedy new "
        f"tokens, batch 1, {platform.machine()} CPU ({torch.get_num_threads()} torch threads), torch {torch.__version__}. "
        f"Generated by `python benchmarks/eviction.py`. Decode time: fastest of {args.rounds} round-robin rounds of "
        f"{args.steps} steps per policy, after the {args.new} match tokens (context about {ids.shape[1] + args.new} "
        "tokens); prefill ratios are single runs on a shared, loaded machine (noisy).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(r) + " |" for r in rows),
        "",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
