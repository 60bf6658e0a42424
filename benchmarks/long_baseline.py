"""Issue 13's "before": SmolLM2 at ~7.5k tokens, budget 512, 16 new tokens; full / offload / window,
one-shot vs chunked prefill; each run a fresh process (kvbound.bench.long), a few at a time.

    PYTHONPATH=src python3 benchmarks/long_baseline.py OUT.jsonl [--parallel 3]
    PYTHONPATH=src python3 benchmarks/long_baseline.py OUT.jsonl --render OUT.md   # the table, no runs
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

from kvbound.bench.long import LongJob, compare, spawn
from kvbound.bench.long_report import HEADER, table_rows
from kvbound.bench.report import _table


def _over(r: dict, ref: dict | None, key: str) -> str:
    if ref is None or r.get(key) is None or not ref.get(key):
        return "–"
    return f"{r[key] / ref[key]:.2f}×"


def render(jsonl: str, out: str) -> None:
    """Each run against ``full`` with the same prefill chunk; ``full`` one-shot is the reference of
    the ``ratio to full one-shot`` columns (the issue's "today")."""
    runs = [json.loads(line) for line in open(jsonl) if line.strip()]
    runs.sort(key=lambda r: (r.get("chunk") or 0, r["policy"] != "full", r["policy"]))
    full = {r.get("chunk"): r for r in runs if r["policy"] == "full" and r.get("status") == "ok"}
    one_shot = full.get(None)
    rows = []
    for r in runs:
        if r["policy"] != "full" or r.get("chunk") is not None:
            compare(r, full.get(r.get("chunk")) if r["policy"] != "full" else one_shot)
        extra = [_over(r, one_shot, k) for k in ("rss_added_bytes", "prefill_cpu_seconds", "cpu_seconds_per_token")]
        rows.append((r, extra))
    lines = [_table(HEADER + ["RSS added ÷ full one-shot's", "prefill CPU ÷ full one-shot's",
                              "decode CPU/token ÷ full one-shot's"],
                    [row + extra for row, (r, extra) in zip(table_rows([r for r, _ in rows]), [x for x in rows
                                                                                          if x[0].get("status") == "ok"])])]
    bad = [r for r in runs if r.get("status") != "ok"]
    lines += [f"- not ok: {r['policy']} chunk={r.get('chunk')}: {r.get('status')} {r.get('reason')}" for r in bad]
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=7500)
    ap.add_argument("--policies", default="full,offload,window")
    ap.add_argument("--chunks", default="0,1024,256", help="0 = one shot")
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--speculate", type=int, default=None, help="exact self-speculative decoding, K drafts")
    ap.add_argument("--render", metavar="MD", help="only write the table of OUT.jsonl to MD")
    args = ap.parse_args()
    if args.render:
        render(args.out, args.render)
        return
    jobs = [LongJob("smollm2-135m", p, args.tokens, None if p == "full" else 512, 16, int(c) or None, args.threads,
                    speculate=args.speculate)
            for c in args.chunks.split(",") for p in args.policies.split(",")]

    def one(job: LongJob) -> None:
        rec = spawn(job, timeout=3600)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(job.label, rec.get("status"), rec.get("reason"), flush=True)

    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(one, jobs))


if __name__ == "__main__":
    main()
