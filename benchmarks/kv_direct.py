"""KV-Direct benchmark on SmolLM2: speed, memory per tier and exactness of ``kv-direct`` and ``residual``.

Everything is measured in one run on this machine (ratios are against ``full`` in the same run):

* decode time per token of ``kv-direct`` and ``residual`` / ``full`` at budgets of 25% and 50%
  of the context, and how much of it is spent rebuilding evicted K/V;
* bytes per token of each tier, analytic beside measured: K/V, per-layer residual, layer-0
  residual, token id;
* peak hot K/V and peak transient bytes;
* recomputed vs cached K/V (max |dK|, |dV|, bit-equality) with and without matching row grouping;
* a profile of one ``kv-direct`` decode step (top operators by self CPU time).

Usage: ``python benchmarks/kv_direct.py [--prompt 512] [--new 64] [--out benchmarks/results/kv_direct.md]``
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
from kvbound.cache.base import nbytes

POLICIES = ("kv-direct", "residual")


def prompt_ids(tok, n: int) -> torch.Tensor:
    text = "\n\n".join((files("kvbound") / "data" / "prompts" / f"{name}.txt").read_text()
                       for name in ("lighthouse", "canals", "orchard"))
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        raise SystemExit(f"only {ids.shape[1]} prompt tokens available, asked for {n}")
    return ids


class RebuildTimer:
    """Wraps ``cache.rebuild`` (this instance only) to add up the time spent rebuilding K/V."""

    def __init__(self, cache) -> None:
        self.seconds, self.calls, inner = 0.0, 0, cache.rebuild

        def timed(*args):
            t0 = time.perf_counter()
            out = inner(*args)
            self.seconds += time.perf_counter() - t0
            self.calls += 1
            return out

        cache.rebuild = timed


@torch.inference_mode()
def decode_lockstep(model, ids: torch.Tensor, caches: dict, new: int) -> dict[str, dict]:
    """Prefill every cache, then ``new - 1`` greedy steps with the caches taking turns, so
    that load from other processes drifts over all runs alike. Each step is timed."""
    runs = {}
    for name, cache in caches.items():
        timer = RebuildTimer(cache) if hasattr(cache, "rebuild") else None
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache)
        runs[name] = {"cache": cache, "timer": timer, "prefill_s": time.perf_counter() - t0, "step_s": 0.0,
                      "rebuild_prefill": timer.seconds if timer else 0.0,
                      "tokens": [out.logits[:, -1:].argmax(-1)]}
    for _ in range(new - 1):
        for r in runs.values():
            t0 = time.perf_counter()
            out = model(r["tokens"][-1], past_key_values=r["cache"])
            r["step_s"] += time.perf_counter() - t0
            r["tokens"].append(out.logits[:, -1:].argmax(-1))
    result = {}
    for name, r in runs.items():
        timer = r["timer"]
        result[name] = {
            "tokens": torch.cat(r["tokens"], dim=1)[0].tolist(),
            "prefill_s": r["prefill_s"],
            "decode_s_per_token": r["step_s"] / (new - 1),
            "rebuild_s_per_token": (timer.seconds - r["rebuild_prefill"]) / (new - 1) if timer else 0.0,
            "memory": r["cache"].memory_report(),
        }
    return result


@torch.inference_mode()
def kv_error(model, chunks: list[torch.Tensor], policy: str, budget: int) -> dict:
    """Feed ``chunks`` to ``full`` and ``policy``; compare the K/V rebuilt in the last chunk."""
    full = kvbound.make_cache(model, "full")
    cache = kvbound.make_cache(model, policy, budget=budget)
    got, inner = {}, cache.rebuild

    def record(layer, start, end, like):
        k, v = inner(layer, start, end, like)
        got[layer.layer_idx] = (start, end, k.clone(), v.clone())
        return k, v

    cache.rebuild = record
    for chunk in chunks:
        model(chunk, past_key_values=full)
        got.clear()
        model(chunk, past_key_values=cache)
    dk = dv = 0.0
    equal = True
    for l, (start, end, k, v) in got.items():
        ref_k, ref_v = full.layers[l].keys[..., start:end, :], full.layers[l].values[..., start:end, :]
        dk = max(dk, (k - ref_k).abs().max().item())
        dv = max(dv, (v - ref_v).abs().max().item())
        equal = equal and torch.equal(k, ref_k) and torch.equal(v, ref_v)
    span = next(iter(got.values()))[:2] if got else None
    return {"policy": policy, "layers": len(got), "span": span, "max_abs_dK": dk, "max_abs_dV": dv, "equal": equal}


def analytic_bytes(model) -> dict[str, int]:
    cfg = model.config.get_text_config(decoder=True)
    item = torch.empty((), dtype=model.dtype).element_size()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "kv": 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * item,
        "per_layer_residual": cfg.num_hidden_layers * cfg.hidden_size * item,
        "layer0_residual": cfg.hidden_size * item,
        "token_id": 4 if cfg.vocab_size < 2**31 else 8,
    }


def profile_step(model, ids: torch.Tensor, budget: int, rows: int = 12) -> str:
    cache = kvbound.make_cache(model, "kv-direct", budget=budget)
    with torch.inference_mode():
        out = model(ids, past_key_values=cache)
        nxt = out.logits[:, -1:].argmax(-1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            model(nxt, past_key_values=cache)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown report here (and .json beside it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tok = models.load("smollm2-135m")
    ids = prompt_ids(tok, args.prompt)
    context = args.prompt + args.new
    budgets = [context // 4, context // 2]
    lines = [f"# kv-direct / residual on SmolLM2-135M ({platform.machine()}, {torch.get_num_threads()} threads, "
             f"torch {torch.__version__})", "",
             f"prompt {args.prompt} tokens + {args.new} greedy tokens = context {context}; budgets {budgets} "
             "(25% and 50% of the context). Decode time excludes the prefill; the runs take turns step by step "
             "so that load from other processes falls on all of them alike.", ""]

    caches = {"full": kvbound.make_cache(model, "full")}
    for policy in POLICIES:
        for budget in budgets:
            caches[f"{policy}@{budget}"] = kvbound.make_cache(model, policy, budget=budget)
    runs = decode_lockstep(model, ids, caches, args.new)
    base = runs["full"]["decode_s_per_token"]
    lines += ["## Time per token (ratio to full, same run)", "",
              "| run | decode s/token | ratio to full | rebuild s/token | prefill s | tokens == full |",
              "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['decode_s_per_token']:.4f} | {r['decode_s_per_token'] / base:.2f}x | "
                     f"{r['rebuild_s_per_token']:.4f} | {r['prefill_s']:.3f} | "
                     f"{r['tokens'] == runs['full']['tokens']} |")

    # bytes per token, measured on the tensors the caches hold at the end of the runs
    analytic = analytic_bytes(model)
    small = budgets[0]
    seen = runs["full"]["memory"]["tokens_seen"]
    kvd, res = runs[f"kv-direct@{small}"]["memory"], runs[f"residual@{small}"]["memory"]
    layer0 = kvbound.make_cache(model, "kv-direct", budget=1).driver.embed(ids[:, :1])
    measured = {
        "kv": runs["full"]["memory"]["hot_kv_bytes"] / seen,
        "per_layer_residual": res["bytes_by_tier"]["checkpoints"] / (seen - small),
        "layer0_residual": nbytes(layer0),
        "token_id": kvd["bytes_by_tier"]["checkpoints"] / seen,
    }
    lines += ["", "## Bytes per token by tier (analytic vs measured)", "",
              "| tier | analytic | measured | what measured means |", "|---|---|---|---|"]
    how = {"kv": "full cache hot_kv / tokens", "per_layer_residual": "residual `checkpoints` / evicted tokens",
           "layer0_residual": "nbytes(embed(one id))", "token_id": "kv-direct `checkpoints` / tokens"}
    for tier in analytic:
        lines.append(f"| {tier} | {analytic[tier]} | {measured[tier]:.1f} | {how[tier]} |")

    lines += ["", "## Memory at the end of each run (bytes)", "",
              "| run | hot_kv | peak_hot_kv | checkpoints | pending_residuals | residual_slack | peak_transient |",
              "|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        m, t = r["memory"], r["memory"]["bytes_by_tier"]
        lines.append(f"| {name} | {t.get('hot_kv', 0)} | {m['peak_hot_kv_bytes']} | {t.get('checkpoints', 0)} | "
                     f"{t.get('pending_residuals', 0)} | {t.get('residual_slack', 0)} | {m['peak_transient_bytes']} |")

    span, budget = 200, 64
    errors = []
    for policy in POLICIES:
        # grouping matches: the span 0..span was first computed by a forward of exactly those rows
        errors.append({"grouping": "same rows", **kv_error(
            model, [ids[:, :span], ids[:, span:span + budget], ids[:, span + budget:span + budget + 1]], policy, budget)})
        # grouping differs: the span is a prefix of a longer prefill
        errors.append({"grouping": "prefix of longer prefill", **kv_error(
            model, [ids[:, :span + budget], ids[:, span + budget:span + budget + 1]], policy, budget)})
    lines += ["", "## Recomputed vs cached K/V (max over rebuilt layers and tokens)", "",
              "| policy | grouping | span | max abs dK | max abs dV | torch.equal |", "|---|---|---|---|---|---|"]
    for e in errors:
        lines.append(f"| {e['policy']} | {e['grouping']} | {e['span']} | {e['max_abs_dK']:.3g} | "
                     f"{e['max_abs_dV']:.3g} | {e['equal']} |")

    lines += ["", f"## Profile of one kv-direct decode step (budget {small}, span {args.prompt - small} tokens)", "",
              "```", profile_step(model, ids, small).rstrip(), "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        record = {"prompt": args.prompt, "new": args.new, "budgets": budgets, "analytic": analytic,
                  "measured": measured, "errors": errors,
                  "runs": {k: {kk: vv for kk, vv in r.items() if kk != "tokens"} | {"tokens_equal_full": r["tokens"] == runs["full"]["tokens"]}
                           for k, r in runs.items()}}
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
