"""Choose kvbound.generation.DEFAULT_PREFILL_CHUNK: SmolLM2 prefill (``full`` cache, time to the first
token) one-shot vs chunked, interleaved in one process. Reports wall and CPU seconds; with one torch
thread the CPU time is the work done, which a CPU shared with other jobs barely moves.

    PYTHONPATH=src python3 benchmarks/prefill_chunk.py --tokens 2048,7500 --chunks 0,512,1024,2048 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from kvbound import make_cache
from kvbound.bench.inputs import haystack_ids
from kvbound.generation import Timings, greedy
from kvbound.models import load


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", default="2048,7500")
    ap.add_argument("--chunks", default="0,512,1024,2048", help="0 = one shot")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "prefill_chunk.jsonl"
    for tokens in [int(t) for t in args.tokens.split(",")]:
        ids, _ = haystack_ids(tok, tokens)
        for rep in range(args.repeats):
            for chunk in [int(c) for c in args.chunks.split(",")]:
                cache = make_cache(model, "full")
                timings = Timings()
                new = greedy(model, ids, cache, 2, stop_at_eos=False, prefill_chunk=chunk or None, timings=timings)
                rec = {"tokens": tokens, "chunk": chunk or None, "repeat": rep, "threads": args.threads,
                       "prefill_seconds": timings.prefill_seconds, "prefill_cpu_seconds": timings.prefill_cpu_seconds,
                       "first_tokens": new[0].tolist()}
                print(json.dumps(rec), flush=True)
                with log.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                del cache


if __name__ == "__main__":
    main()
