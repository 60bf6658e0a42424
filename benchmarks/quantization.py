"""Quantized K/V on SmolLM2: bytes vs perplexity, token match and decode time, in one run.

Variants: ``full`` (reference), ``kivi`` at 8/4/2 bits, transformers' ``QuantizedCache`` through
``hf-quantized`` (quanto 4/2 bits, fp8), and ``offload`` with and without an int8/int4 codec.

* perplexity: teacher-forced over ``--ppl-tokens`` tokens of the built-in prompts (concatenated), fed
  ``--chunk`` tokens per forward pass through the cache (``kvbound.quality.perplexity``);
* bytes: every tier the cache holds after that pass (``bytes_by_tier``), as a ratio to ``full``'s;
* decode: after a chunked prefill of the same text, ``--decode-tokens`` greedy steps, the variants
  stepped round-robin (one step of each in turn) so machine load hits them alike; time/token is the
  median step, as a ratio to ``full``'s; token match = share of positions equal to ``full``'s greedy tokens;
* long decode: the same at ``--long-tokens`` (offload fp32 vs its codecs), on a longer text.

    PYTHONPATH=src python3 benchmarks/quantization.py --out benchmarks/results/quantization
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import kvbound
from kvbound.bench.inputs import load_prompts
from kvbound.generation import prefill
from kvbound.models import load
from kvbound.quality import perplexity as shared_perplexity

VARIANTS: dict[str, tuple[str, int | None, dict]] = {
    "full": ("full", None, {}),
    "kivi-8": ("kivi", None, {"bits": 8}),
    "kivi-4": ("kivi", None, {"bits": 4}),
    "kivi-2": ("kivi", None, {"bits": 2}),  # group 16 (int2's default), values clip-searched
    "kivi-2-noclip": ("kivi", None, {"bits": 2, "clip": False}),
    "kivi-2-g32": ("kivi", None, {"bits": 2, "group": 32}),
    "kivi-2-g32-noclip": ("kivi", None, {"bits": 2, "group": 32, "clip": False}),
    "kivi-2-o2": ("kivi", None, {"bits": 2, "outliers": 2}),
    "kivi-4-o2": ("kivi", None, {"bits": 4, "outliers": 2}),
    "kivi-4-decoded": ("kivi", None, {"bits": 4, "kernel": False}),  # dequantized each step, no C kernel
    "hf-quanto-4": ("hf-quantized", None, {"backend": "quanto", "bits": 4}),
    "hf-quanto-2": ("hf-quantized", None, {"backend": "quanto", "bits": 2}),
    "hf-fp8": ("hf-quantized", None, {"backend": "fp8"}),
    "offload": ("offload", 256, {}),
    "offload-int8": ("offload", 256, {"codec": "int8"}),
    "offload-int4": ("offload", 256, {"codec": "int4"}),
    "offload-int8-o2": ("offload", 256, {"codec": "int8", "codec_outliers": 2}),
    "offload-int4-o2": ("offload", 256, {"codec": "int4", "codec_outliers": 2}),
    "offload-int8-decoded": ("offload", 256, {"codec": "int8", "kernel": False}),
}
DEFAULT = ["full", "kivi-8", "kivi-4", "kivi-2", "kivi-2-g32", "hf-quanto-4", "hf-quanto-2", "hf-fp8", "offload",
           "offload-int8", "offload-int4"]
LONG_VARIANTS = {"offload": ("offload", 1024, {}), "offload-int8": ("offload", 1024, {"codec": "int8"}),
                 # the same records decoded into a float buffer before attention (no C kernel)
                 "offload-int8-decoded": ("offload", 1024, {"codec": "int8", "kernel": False})}
LONG_TEXT = "/usr/share/common-licenses/GPL-3"  # ~7.6k SmolLM2 tokens of plain English, on any Debian


def perplexity(model, input_ids: torch.Tensor, cache, chunk: int) -> float:
    """exp(mean NLL) of each next token, the text fed ``chunk`` tokens per pass through ``cache``."""
    return shared_perplexity(model, input_ids, cache, chunk=chunk).perplexity


def make(model, spec):
    policy, budget, options = spec
    return kvbound.make_cache(model, policy, budget, **options)


def round_robin_decode(model, ids: torch.Tensor, specs: dict, steps: int, chunk: int, cold: bool = False) -> dict:
    """Prefill each variant, then step them one token each in turn; per-step seconds and tokens.

    ``cold``: each offload variant also takes a second step per round right after its store files
    were flushed and dropped from the OS page cache (``OffloadCache.drop_page_cache``), so that step
    reads the offloaded K/V from disk (``cold_steps_s``, ``cold_seconds_per_token``)."""
    caches, nxt, out = {}, {}, {}
    for name, spec in specs.items():
        t = time.perf_counter()
        caches[name] = make(model, spec)
        prefill(model, ids[:, :-1], caches[name], chunk)
        nxt[name] = ids[:, -1:]
        out[name] = {"prefill_s": time.perf_counter() - t, "steps_s": [], "tokens": []}
        print(f"  prefilled {name} in {out[name]['prefill_s']:.1f} s", flush=True)
    with torch.no_grad():
        for _ in range(steps):
            for name, cache in caches.items():
                t = time.perf_counter()
                logits = model(nxt[name], past_key_values=cache, use_cache=True).logits[:, -1]
                out[name]["steps_s"].append(time.perf_counter() - t)
                nxt[name] = logits.argmax(-1, keepdim=True)
                out[name]["tokens"].append(int(nxt[name]))
                if cold and hasattr(cache, "drop_page_cache"):
                    cache.drop_page_cache()
                    t = time.perf_counter()
                    logits = model(nxt[name], past_key_values=cache, use_cache=True).logits[:, -1]
                    out[name].setdefault("cold_steps_s", []).append(time.perf_counter() - t)
                    nxt[name] = logits.argmax(-1, keepdim=True)
    for name, cache in caches.items():
        out[name]["memory"] = cache.memory_report()
        out[name]["seconds_per_token"] = statistics.median(out[name]["steps_s"])
        if "cold_steps_s" in out[name]:
            out[name]["cold_seconds_per_token"] = statistics.median(out[name]["cold_steps_s"])
        cache.close()
    return out


def report(results: dict) -> str:
    """Markdown tables of ``results`` (ratios against ``full`` / fp32 ``offload`` of the same run)."""
    meta, ppl, dec, long = results["meta"], results["ppl"], results["decode"], results["long"]
    variants = meta["variants"]
    f_ppl = ppl.get("full", {}).get("perplexity")
    def held(row):  # every tier but file space reserved ahead and not yet written (offload_slack)
        return row["total_bytes"] - row["bytes_by_tier"].get("offload_slack", 0)

    f_bytes = held(ppl["full"]) if "full" in ppl else None
    f_dec = dec.get("full", {})
    lines = [f"# Quantized K/V on SmolLM2-135M ({meta['ppl_tokens']} tokens)", "",
             f"Perplexity over {meta['ppl_tokens']} tokens of the built-in prompts, fed {meta['chunk']} tokens per pass "
             f"through each cache ({ppl.get('full', {}).get('perplexity_fn', '?')}); bytes = every tier held after that pass "
             "(offload: hot window + offloaded records; file space reserved ahead, `offload_slack`, left out); "
             f"decode = median step of {meta['decode_tokens']} greedy tokens after the same text, variants stepped "
             f"round-robin in one process ({meta['threads']} thread(s), {meta['cpus']} CPUs, shared machine); token "
             "match = positions equal to full's greedy tokens.", "",
             "| variant | policy and options | exact | perplexity | Δ vs full | cache bytes | × full | token match | "
             "time/token × full |", "|---|---|---|---|---|---|---|---|---|"]
    order = {name: i for i, name in enumerate(VARIANTS)}
    for name, row in sorted(ppl.items(), key=lambda item: order.get(item[0], len(order))):
        policy, budget, options = variants.get(name, ("?", None, {}))
        opts = ", ".join(f"{k}={v}" for k, v in options.items()) + (f" budget={budget}" if budget else "")
        d = dec.get(name)
        match = (f"{sum(a == b for a, b in zip(d['tokens'], f_dec['tokens'])) / len(f_dec['tokens']):.0%}"
                 if d and f_dec else "–")
        speed = f"{d['seconds_per_token'] / f_dec['seconds_per_token']:.2f}×" if d and f_dec else "–"
        lines.append(f"| `{name}` | `{policy}` {opts} | {'yes' if row.get('exact') else 'no'} | {row['perplexity']:.3f} | "
                     f"{(row['perplexity'] / f_ppl - 1) * 100:+.2f}% | {held(row) / 2**20:.2f} MiB | "
                     f"{held(row) / f_bytes:.3f} | {match} | {speed} |")
    if f_dec:
        lines += ["", f"full's decode step: {f_dec['seconds_per_token'] * 1000:.1f} ms (median)."]
    if long:
        base = long.get("offload")
        lines += ["", f"## Decode at {meta.get('long_tokens')} tokens: offload with and without a codec", "",
                  "Warm: the store files sit in the OS page cache (RAM), as on a machine with memory to spare; "
                  "cold: before each such step the files were flushed and dropped from the page cache "
                  "(`OffloadCache.drop_page_cache`), so the step reads the offloaded K/V from disk, as when the "
                  "store is larger than the RAM left to cache it. Both step kinds alternate round-robin in one process.",
                  "", "| variant | options | offloaded bytes | time/token warm | × fp32 offload | time/token cold | "
                  "× fp32 offload |", "|---|---|---|---|---|---|---|"]
        for name, d in long.items():
            policy, budget, options = meta["long_variants"][name]
            tiers = d["memory"]["bytes_by_tier"]
            cold = d.get("cold_seconds_per_token")
            cold_cols = (f"{cold * 1000:.1f} ms | {cold / base['cold_seconds_per_token']:.2f}×"
                         if cold and base.get("cold_seconds_per_token") else "– | –")
            lines.append(f"| `{name}` | budget={budget} {', '.join(f'{k}={v}' for k, v in options.items())} | "
                         f"{tiers.get('offloaded', 0) / 2**20:.1f} MiB | {d['seconds_per_token'] * 1000:.1f} ms | "
                         f"{d['seconds_per_token'] / base['seconds_per_token']:.2f}× | {cold_cols} |")
    runs = meta.get("stage_runs", {})
    if runs:
        lines += ["", "## Runs", "", "Each stage's runs (UTC, 1/5/15-minute load average of the shared 2-core machine):", ""]
        for stage, stage_runs in runs.items():
            for run in stage_runs:
                when = " → ".join(f"{run[k]['utc']} (load {', '.join(f'{x:.1f}' for x in run[k]['loadavg'])})"
                                  for k in ("start", "end") if k in run)
                lines.append(f"- {stage}: {when}: `{run.get('command', '?')}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/quantization")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=32, help="tokens per pass for perplexity")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=7500)
    ap.add_argument("--long-decode-tokens", type=int, default=16)
    ap.add_argument("--variants", default=",".join(DEFAULT), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--skip", default="", help="stages to skip (their earlier results in --out are kept): ppl,decode,long")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    model, tok = load("smollm2-135m")
    text = "\n\n".join(p.text for p in load_prompts())
    ids = tok(text, return_tensors="pt").input_ids[:, : args.ppl_tokens]
    names = args.variants.split(",")
    results = {"meta": {"model": "smollm2-135m", "ppl_tokens": ids.shape[1], "chunk": args.chunk,
                        "decode_tokens": args.decode_tokens, "threads": args.threads, "torch": torch.__version__,
                        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                        "variants": {n: VARIANTS[n] for n in names}, "long_variants": LONG_VARIANTS,
                        "command": " ".join(["python3", *sys.argv]), "stage_runs": {}},
               "ppl": {}, "decode": {}, "long": {}}
    path = out / "results.json"
    if path.exists():  # stages skipped now keep their earlier results
        old = json.loads(path.read_text())
        results.update({k: old[k] for k in ("decode", "long") if k in old and k in skip})
        if "long" in skip and "long_tokens" in old["meta"]:
            results["meta"]["long_tokens"] = old["meta"]["long_tokens"]
        results["ppl"] = old.get("ppl", {})  # perplexity rows accumulate: a run adds or replaces variants
        results["meta"]["variants"] = {**old["meta"].get("variants", {}), **results["meta"]["variants"]}
        results["meta"]["earlier"] = {k: v for k, v in old["meta"].items() if k not in ("earlier", "stage_runs")}
        runs = old["meta"].get("stage_runs", {})  # kept: skipped stages' runs, and ppl's (its rows accumulate)
        results["meta"]["stage_runs"] = {k: v for k, v in runs.items() if k in skip or k == "ppl"}

    def stamp(stage: str, when: str) -> None:  # date, load average (shared machine) and command of each stage run
        runs = results["meta"]["stage_runs"].setdefault(stage, [])
        if when == "start" or not runs:
            runs.append({"command": results["meta"]["command"]})
        runs[-1][when] = {"utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "loadavg": os.getloadavg()}

    def save():
        path.write_text(json.dumps(results, indent=1))
        (out / "report.md").write_text(report(results))

    if "ppl" not in skip:
        stamp("ppl", "start")
        for name in names:
            cache = make(model, VARIANTS[name])
            t = time.perf_counter()
            ppl = perplexity(model, ids, cache, args.chunk)
            rep = cache.memory_report()
            cache.close()
            results["ppl"][name] = {"perplexity": ppl, "seconds": time.perf_counter() - t,
                                    "bytes_by_tier": rep["bytes_by_tier"], "total_bytes": rep["total_bytes"],
                                    "exact": rep["exact"], "perplexity_fn": "kvbound.quality.perplexity"}
            print(f"{name:14s} ppl {ppl:.4f}  bytes {rep['total_bytes']:,}  {rep['bytes_by_tier']}", flush=True)
            stamp("ppl", "end")
            save()
            gc.collect()
    if "decode" not in skip:
        print("decode at", ids.shape[1], "tokens", flush=True)
        stamp("decode", "start")
        results["decode"] = round_robin_decode(model, ids, {n: VARIANTS[n] for n in names}, args.decode_tokens,
                                               args.prefill_chunk)
        stamp("decode", "end")
        save()
    if "long" not in skip:
        long_text = Path(LONG_TEXT).read_text() if Path(LONG_TEXT).exists() else text * 4
        long_ids = tok(long_text, return_tensors="pt").input_ids[:, : args.long_tokens]
        results["meta"]["long_tokens"] = long_ids.shape[1]
        print("decode at", long_ids.shape[1], "tokens", flush=True)
        stamp("long", "start")
        results["long"] = round_robin_decode(model, long_ids, LONG_VARIANTS, args.long_decode_tokens, args.prefill_chunk,
                                             cold=True)
        stamp("long", "end")
        save()
    print("wrote", path)


if __name__ == "__main__":
    main()
