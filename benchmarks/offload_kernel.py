"""``offload`` with an integer codec on SmolLM2: decode at ~7.5k tokens and perplexity, through kvbound's C
kernel (``kvbound.kernels``: attention reads the coded records) against decoding the records into a
float buffer first (``kernel=False``) and against fp32 records, in one process.

* decode: the variants prefilled with the same ~7.5k-token haystack (budget 1024), then stepped
  round-robin (one greedy step of each in turn; the store files stay in the OS page cache); median
  step time as a ratio to fp32 ``offload``'s, and each variant's tokens against fp32's;
* perplexity: teacher-forced over the built-in prompts, one token per pass (``--chunk 1``: every
  prediction is a decoding step, so the kernel computes it), for ``full`` and the int8 variants
  (budget 256).

    python3 benchmarks/offload_kernel.py [--threads 1] [--steps 12] [--ppl-tokens 2038] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import kvbound
from kvbound import kernels
from kvbound.bench.inputs import haystack_ids, load_prompts
from kvbound.models import load
from kvbound.quality import perplexity
from quantization import round_robin_decode  # benchmarks/quantization.py, beside this script

DECODE = {  # name: (policy, budget, options)
    "fp32": ("offload", 1024, {}),
    "int8 kernel": ("offload", 1024, {"codec": "int8"}),
    "int8 decoded": ("offload", 1024, {"codec": "int8", "kernel": False}),
    "int4 kernel": ("offload", 1024, {"codec": "int4"}),
    "int4 decoded": ("offload", 1024, {"codec": "int4", "kernel": False}),
}
PPL = {  # name: (policy, budget, options)
    "full": ("full", None, {}),
    "offload int8 kernel": ("offload", 256, {"codec": "int8"}),
    "offload int8 decoded": ("offload", 256, {"codec": "int8", "kernel": False}),
}


def stamp() -> dict:
    return {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": os.getloadavg()}


def report(res: dict) -> str:
    meta, dec, ppl = res["meta"], res["decode"], res["ppl"]
    base = dec["fp32"]
    lines = [f"# offload codecs through kvbound's C kernel (SmolLM2-135M, {meta['threads']} thread(s))", "",
             f"`{meta['command']}`", "",
             f"Kernel built: {meta['kernel']}. Runs (UTC, 1/5/15-min load): " + "; ".join(
                 f"{k} {v['utc']} (load {', '.join(f'{x:.1f}' for x in v['loadavg'])})" for k, v in meta["runs"].items()),
             "", f"## Decode at {meta['decode_tokens']} tokens, budget 1024 (store in the page cache)", "",
             f"Median of {meta['steps']} greedy steps per variant, stepped round-robin in one process.", "",
             "| variant | offloaded | time/token | × fp32 offload | tokens equal to fp32's |", "|---|---|---|---|---|"]
    for name, d in dec.items():
        same = sum(a == b for a, b in zip(d["tokens"], base["tokens"])) / len(base["tokens"])
        offloaded = d["memory"]["bytes_by_tier"]["offloaded"]
        lines.append(f"| {name} | {offloaded / 2**20:.1f} MiB | {d['seconds_per_token'] * 1000:.1f} ms | "
                     f"{d['seconds_per_token'] / base['seconds_per_token']:.2f}× | {same:.0%} |")
    if ppl:
        f = ppl["full"]["perplexity"]
        lines += ["", f"## Perplexity over {meta['ppl_tokens']} tokens, one token per pass", "",
                  "| variant | perplexity | Δ vs full | seconds |", "|---|---|---|---|"]
        for name, row in ppl.items():
            lines.append(f"| {name} | {row['perplexity']:.4f} | {(row['perplexity'] / f - 1) * 100:+.3f}% | "
                         f"{row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=7500)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--ppl-tokens", type=int, default=2038, help="0 skips the perplexity stage")
    ap.add_argument("--out", default="benchmarks/results/quantization/offload-kernel")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tok = load("smollm2-135m")
    res = {"meta": {"command": " ".join(["python3", *sys.argv]), "threads": args.threads, "steps": args.steps,
                    "kernel": kernels.available(), "torch": torch.__version__, "runs": {"start": stamp()}},
           "decode": {}, "ppl": {}}
    ids, _ = haystack_ids(tok, args.tokens)
    res["meta"]["decode_tokens"] = ids.shape[1]
    print("decode at", ids.shape[1], "tokens", flush=True)
    res["decode"] = round_robin_decode(model, ids, DECODE, args.steps, args.prefill_chunk)
    res["meta"]["runs"]["decode done"] = stamp()
    if args.ppl_tokens:
        text = "\n\n".join(p.text for p in load_prompts())
        ppl_ids = tok(text, return_tensors="pt").input_ids[:, : args.ppl_tokens]
        res["meta"]["ppl_tokens"] = ppl_ids.shape[1]
        for name, (policy, budget, options) in PPL.items():
            cache = kvbound.make_cache(model, policy, budget, **options)
            t = time.perf_counter()
            ppl = perplexity(model, ppl_ids, cache, chunk=1).perplexity
            res["ppl"][name] = {"perplexity": ppl, "seconds": time.perf_counter() - t}
            print(f"  {name}: perplexity {ppl:.4f}", flush=True)
            if hasattr(cache, "close"):
                cache.close()
        res["meta"]["runs"]["ppl done"] = stamp()
    (out / "results.json").write_text(json.dumps(res, indent=1))
    (out / "report.md").write_text(report(res))
    print(report(res))


if __name__ == "__main__":
    main()
