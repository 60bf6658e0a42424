"""Issue 13's "before": SmolLM2 at ~7.5k tokens, budget 512, 16 new tokens; full / offload / window,
one-shot vs chunked prefill; each run a fresh process (kvbound.bench.long), a few at a time.

    PYTHONPATH=src python3 benchmarks/long_baseline.py OUT.jsonl [--parallel 3]
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor

from kvbound.bench.long import LongJob, spawn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tokens", type=int, default=7500)
    ap.add_argument("--policies", default="full,offload,window")
    ap.add_argument("--chunks", default="0,1024,256", help="0 = one shot")
    ap.add_argument("--parallel", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    jobs = [LongJob("smollm2-135m", p, args.tokens, None if p == "full" else 512, 16, int(c) or None, args.threads)
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
