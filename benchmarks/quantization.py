"""Quantized K/V on SmolLM2: bytes vs perplexity, token match and decode time, in one run.

Variants: ``full`` (reference), ``kivi`` at 8/4/2 bits, transformers' ``QuantizedCache`` through
``hf-quantized`` (quanto 4/2 bits, fp8), and ``offload`` with and without an int8/int4 codec.

* perplexity: teacher-forced over ``--ppl-tokens`` tokens of the built-in prompts (concatenated), fed
  ``--chunk`` tokens per forward pass through the cache (``kvbound.quality.perplexity`` when present);
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
import time
from pathlib import Path

import torch

import kvbound
from kvbound.bench.inputs import load_prompts
from kvbound.generation import prefill
from kvbound.models import load

VARIANTS: dict[str, tuple[str, int | None, dict]] = {
    "full": ("full", None, {}),
    "kivi-8": ("kivi", None, {"bits": 8}),
    "kivi-4": ("kivi", None, {"bits": 4}),
    "kivi-2": ("kivi", None, {"bits": 2}),
    "hf-quanto-4": ("hf-quantized", None, {"backend": "quanto", "bits": 4}),
    "hf-quanto-2": ("hf-quantized", None, {"backend": "quanto", "bits": 2}),
    "hf-fp8": ("hf-quantized", None, {"backend": "fp8"}),
    "offload": ("offload", 256, {}),
    "offload-int8": ("offload", 256, {"codec": "int8"}),
    "offload-int4": ("offload", 256, {"codec": "int4"}),
}
LONG_VARIANTS = {"offload": ("offload", 1024, {}), "offload-int8": ("offload", 1024, {"codec": "int8"}),
                 "offload-int4": ("offload", 1024, {"codec": "int4"})}
LONG_TEXT = "/usr/share/common-licenses/GPL-3"  # ~7.6k SmolLM2 tokens of plain English, on any Debian


def perplexity(model, input_ids: torch.Tensor, cache, chunk: int) -> float:
    """exp(mean NLL) of each next token, the text fed ``chunk`` tokens per pass through ``cache``."""
    try:
        from kvbound.quality import perplexity as shared
    except ImportError:
        shared = None
    if shared is not None:
        return float(shared(model, input_ids, cache, chunk=chunk))
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, input_ids.shape[1] - 1, chunk):
            ids = input_ids[:, s:s + chunk]
            logits = model(ids, past_key_values=cache, use_cache=True).logits[0].float()
            target = input_ids[0, s + 1:s + 1 + ids.shape[1]]
            lp = torch.log_softmax(logits[: target.shape[0]], -1)
            nll -= lp.gather(1, target[:, None]).sum().item()
            n += target.shape[0]
    return float(torch.tensor(nll / n).exp())


def make(model, spec):
    policy, budget, options = spec
    return kvbound.make_cache(model, policy, budget, **options)


def round_robin_decode(model, ids: torch.Tensor, specs: dict, steps: int, chunk: int) -> dict:
    """Prefill each variant, then step them one token each in turn; per-step seconds and tokens."""
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
    for name, cache in caches.items():
        out[name]["memory"] = cache.memory_report()
        out[name]["seconds_per_token"] = statistics.median(out[name]["steps_s"])
        cache.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/quantization")
    ap.add_argument("--ppl-tokens", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=32, help="tokens per pass for perplexity")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--long-tokens", type=int, default=7500)
    ap.add_argument("--long-decode-tokens", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--skip", default="", help="stages to skip: ppl,decode,long")
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
                        "variants": {n: VARIANTS[n] for n in names}, "long_variants": LONG_VARIANTS},
               "ppl": {}, "decode": {}, "long": {}}
    path = out / "results.json"

    def save():
        path.write_text(json.dumps(results, indent=1))

    if "ppl" not in skip:
        for name in names:
            cache = make(model, VARIANTS[name])
            t = time.perf_counter()
            ppl = perplexity(model, ids, cache, args.chunk)
            rep = cache.memory_report()
            cache.close()
            results["ppl"][name] = {"perplexity": ppl, "seconds": time.perf_counter() - t,
                                    "bytes_by_tier": rep["bytes_by_tier"], "total_bytes": rep["total_bytes"],
                                    "exact": rep.get("exact")}
            print(f"{name:14s} ppl {ppl:.4f}  bytes {rep['total_bytes']:,}  {rep['bytes_by_tier']}", flush=True)
            save()
            gc.collect()
    if "decode" not in skip:
        print("decode at", ids.shape[1], "tokens", flush=True)
        results["decode"] = round_robin_decode(model, ids, {n: VARIANTS[n] for n in names}, args.decode_tokens,
                                               args.prefill_chunk)
        save()
    if "long" not in skip:
        long_text = Path(LONG_TEXT).read_text() if Path(LONG_TEXT).exists() else text * 4
        long_ids = tok(long_text, return_tensors="pt").input_ids[:, : args.long_tokens]
        results["meta"]["long_tokens"] = long_ids.shape[1]
        print("decode at", long_ids.shape[1], "tokens", flush=True)
        results["long"] = round_robin_decode(model, long_ids, LONG_VARIANTS, args.long_decode_tokens, args.prefill_chunk)
        save()
    print("wrote", path)


if __name__ == "__main__":
    main()
