"""Project the CPU time of the default ``kvbound bench --scenario needle`` from the per-cell
``cpu_seconds`` of a needle run that covered the default lengths at one depth (a cell's cost does
not depend on the needle's depth; a policy without a run for a kind borrows its single-key cell's cost).

    python3 benchmarks/quality_runtime.py RESULTS_DIR [--depths 3] [--lengths 1024,2048] [--cap 1024]

Prints each (kind, length)'s CPU seconds per policy and the projected total with and without the
``--rerun-max-length`` cap on the policies that re-run the model over the evicted span (kv-direct).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

from kvbound.bench.results import load_results
from kvbound.cache import registered


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results")
    ap.add_argument("--depths", type=int, default=3, help="depths the default runs (default: 3)")
    ap.add_argument("--lengths", default="1024,2048", help="the default's lengths (default: 1024,2048)")
    ap.add_argument("--kinds", default="single,multikey", help="the default's kinds (default: single,multikey)")
    ap.add_argument("--cap", type=int, default=1024, help="--rerun-max-length to project (default: 1024)")
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    kinds = args.kinds.split(",")
    slow = {name for name, spec in registered().items() if spec.reruns_model}
    cost: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
    for r in load_results(args.results)["runs"]:
        if r.get("status") == "ok" and r.get("cpu_seconds") is not None and r["length"] in lengths:
            cost[(r["kind"], r["length"])].setdefault(r["policy"], r["cpu_seconds"])
    for (kind, n), by_policy in sorted(cost.items()):
        print(f"{kind} {n}: " + ", ".join(f"{p} {s:.1f}" for p, s in by_policy.items())
              + f" -- {sum(by_policy.values()):.1f} CPU-s per cell")

    def total(cap: int) -> float:
        seconds = 0.0
        for kind in kinds:
            for n in lengths:
                mine = cost.get((kind, n), {})
                by_policy = {p: mine.get(p, s) for p, s in cost[("single", n)].items()}  # missing: single's cost
                seconds += args.depths * sum(s for p, s in by_policy.items() if not (cap and p in slow and n > cap))
        return seconds

    print(f"projected default needle CPU time: {total(0) / 60:.1f} min with every policy at every length; "
          f"{total(args.cap) / 60:.1f} min with --rerun-max-length {args.cap}")


if __name__ == "__main__":
    main()
