"""GPU smoke run: every registered policy on CUDA, unchanged code.

1. Tiny random-init families on the GPU: exact policies must be token-identical to ``full``
   at several budgets; lossy ones report token match.
2. A random-init model with SmolLM2-135M's shape (no weights can travel to the GPU box):
   time/token of each policy as a ratio to ``full`` measured in the same run.

Usage: python benchmarks/gpu_smoke.py [--device cuda] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvbound
from kvbound.cache.registry import registered
from kvbound.generation import greedy
from kvbound.tiny import build_tiny


def run(model, ids, policy, budget, n, **opts):
    cache = kvbound.make_cache(model, policy, None if policy == "full" else budget, **opts)
    if ids.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = greedy(model, ids, cache, n, stop_at_eos=False)
    if ids.is_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    report = cache.memory_report()
    cache.close()
    return out[0].tolist(), dt / n, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    policies = [p for p in registered() if p != "full"]
    rows = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else platform.processor(),
            "torch": torch.__version__, "tiny": [], "smollm2_shape": []}
    for name in ["tiny-llama", "tiny-qwen3", "tiny-gemma3", "tiny-mha"]:
        model = build_tiny(name).to(dev)
        ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1)).to(dev)
        ref, _, _ = run(model, ids, "full", None, 24)
        for policy in policies:
            for budget in (1, 7, 12):
                try:
                    out, _, _ = run(model, ids, policy, budget, 24)
                except kvbound.KVBoundError as exc:
                    rows["tiny"].append({"model": name, "policy": policy, "budget": budget, "skipped": str(exc)})
                    continue
                match = sum(a == b for a, b in zip(out, ref)) / len(ref)
                exact = registered()[policy].exact
                rows["tiny"].append({"model": name, "policy": policy, "budget": budget, "token_match": match,
                                     "exact_policy": exact, "ok": (match == 1.0) if exact else True})
                print(name, policy, budget, match, flush=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True, initializer_range=0.02)
    model = LlamaForCausalLM(cfg).to(dev).eval()
    for ctx in (512, 2048):
        ids = torch.randint(0, 49152, (1, ctx), generator=torch.Generator().manual_seed(2)).to(dev)
        run(model, ids, "full", None, 4)  # warm-up
        ref, t_full, rep_full = run(model, ids, "full", None, 32)
        for policy in policies:
            budget = ctx // 4
            try:
                out, t, rep = run(model, ids, policy, budget, 32)
            except kvbound.KVBoundError as exc:
                print(policy, "skipped:", exc)
                continue
            row = {"context": ctx, "policy": policy, "budget": budget, "s_per_token": t,
                   "ratio_vs_full": t / t_full, "token_match": sum(a == b for a, b in zip(out, ref)) / len(ref),
                   "peak_hot_kv_bytes": rep["peak_hot_kv_bytes"], "full_peak_hot_kv_bytes": rep_full["peak_hot_kv_bytes"],
                   "peak_transient_bytes": rep["peak_transient_bytes"], "bytes_by_tier": rep["bytes_by_tier"]}
            rows["smollm2_shape"].append(row)
            print(json.dumps(row), flush=True)
        print("full s/token", ctx, t_full)
    bad = [r for r in rows["tiny"] if r.get("ok") is False]
    print("EXACT FAILURES:", bad)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
