"""Decode speed and process memory at ~7.5k tokens (SmolLM2, budget 512): the tiered-attention goals of issue 13.

Thin wrapper, not the bench (``kvbound bench --scenario long`` is the real one):

* ``speed``: one process; each policy prefills the same prompt in chunks (``generation.prefill``),
  then the policies decode round-robin, one token each in turn, so every policy's steps run under
  the same load. Reports the median decode ms/token, its ratio to ``full`` and token match.
* ``rss``: a fresh process per policy; peak RSS (VmHWM) minus the RSS after loading the model.

``--fill random`` skips the model prefill (for an overloaded box): every layer of every cache is
given the same seeded random K/V of ``tokens - 1`` tokens through ``cache.update`` in ``chunk``-token
pieces (so policies spill and evict as in a chunked prefill; scored policies rank with stand-in
queries, their keys). Decode then runs the real model from there; exact policies must still match
``full`` token for token (same K/V). Decode cost depends on what each cache holds, not on its values.

Policies are names or ``name:option=value,...`` (e.g. ``offload:read=pread``).

    PYTHONPATH=src python3 benchmarks/tiered_attention.py speed --tokens 7500 > out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import kvbound
from kvbound import models, rss
from kvbound.generation import prefill

PROMPTS = Path(kvbound.__file__).parent / "data" / "prompts"
POLICIES = ["full", "offload", "window", "h2o", "tova", "snapkv"]


def prompt(tok, n: int) -> torch.Tensor:
    """``n`` token ids of the bundled prompts, repeated (a long technical text)."""
    text = "\n\n".join(p.read_text() for p in sorted(PROMPTS.glob("*.txt")))
    ids = tok(text, return_tensors="pt").input_ids
    return ids.repeat(1, n // ids.shape[1] + 1)[:, :n]


def parse(spec: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value,...`` (integers parsed)."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        options[key] = int(value) if value.isdigit() else value
    return name, options


def random_kv(model, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stand-in K/V of ``n`` tokens for ``layer``: ``[1, kv_heads, n, head_dim]`` each."""
    cfg = model.config.get_text_config(decoder=True)
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(layer)
    return tuple(torch.randn(1, cfg.num_key_value_heads, n, d, generator=g, dtype=model.dtype) for _ in range(2))


@torch.no_grad()
def fill_random(model, cache, n: int, chunk: int) -> None:
    """Feed ``n`` tokens of :func:`random_kv` to every layer, ``chunk`` tokens per update."""
    for i, layer in enumerate(cache.layers):
        k_all, v_all = random_kv(model, i, n)
        groups = model.config.get_text_config(decoder=True).num_attention_heads // k_all.shape[1]
        for start in range(0, n, chunk):
            k, v = k_all[..., start:start + chunk, :], v_all[..., start:start + chunk, :]
            rows = layer.query_rows(k.shape[-2]) if hasattr(layer, "query_rows") and not layer.is_sliding else 0
            if rows:  # scored policy: stand-in queries (its own keys) for the newest rows
                layer.pending_query = k[..., -rows:, :].repeat_interleave(groups, dim=1)
            cache.update(k, v, i)


class Run:
    """One policy: prefilled cache, the next token, decode times and tokens."""

    def __init__(self, model, policy: str, ids: torch.Tensor, budget: int, chunk: int, fill: str = "model") -> None:
        self.policy = policy
        name, options = parse(policy)
        self.cache = kvbound.make_cache(model, name, None if name == "full" else budget, **options)
        t0 = time.perf_counter()
        if fill == "model":
            prefill(model, ids[:, :-1], self.cache, chunk)
        else:
            fill_random(model, self.cache, ids.shape[1] - 1, chunk)
        self.prefill_s = time.perf_counter() - t0
        self.next = ids[:, -1:]
        self.times: list[float] = []
        self.tokens: list[int] = []

    @torch.no_grad()
    def step(self, model) -> None:
        t0 = time.perf_counter()
        logits = model(input_ids=self.next, past_key_values=self.cache, use_cache=True).logits
        self.times.append(time.perf_counter() - t0)
        self.next = logits[:, -1:].argmax(-1)
        self.tokens.append(int(self.next))


def speed(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = models.load(args.model)
    ids = prompt(tok, args.tokens)
    runs = [Run(model, p, ids, args.budget, args.chunk, args.fill) for p in args.policies]
    for _ in range(args.new):
        for run in runs:
            run.step(model)
    full = next((r for r in runs if r.policy == "full"), None)
    base = statistics.median(full.times) if full else None
    out = {"model": args.model, "tokens": args.tokens, "budget": args.budget, "chunk": args.chunk, "fill": args.fill,
           "new_tokens": args.new, "threads": args.threads, "attn_implementation": model.config._attn_implementation,
           "policies": {}}
    for run in runs:
        med = statistics.median(run.times)
        out["policies"][run.policy] = {
            "decode_ms_per_token_median": round(1000 * med, 1),
            "decode_ms_per_token_mean": round(1000 * statistics.mean(run.times), 1),
            "ratio_to_full": None if base is None else round(med / base, 3),
            "prefill_s": round(run.prefill_s, 1),
            "tokens_match_full": None if full is None else run.tokens == full.tokens,
            "hot_kv_bytes": run.cache.memory_report()["hot_kv_bytes"],
        }
        run.cache.close()
    return out


def one_rss(args) -> dict:
    torch.set_num_threads(args.threads)
    model, tok = models.load(args.model)
    ids = prompt(tok, args.tokens)
    loaded = rss.current_rss_bytes()
    rss.reset_peak_rss()
    run = Run(model, args.policies[0], ids, args.budget, args.chunk, args.fill)
    for _ in range(args.new):
        run.step(model)
    peak = rss.peak_rss_bytes()
    return {"policy": run.policy, "loaded_rss_bytes": loaded, "peak_rss_bytes": peak,
            "added_bytes": peak - loaded, "tokens": run.tokens}


def rss_all(args) -> dict:
    out = {}
    for policy in args.policies:
        cmd = [sys.executable, __file__, "one-rss", "--policies", policy, "--tokens", str(args.tokens),
               "--budget", str(args.budget), "--chunk", str(args.chunk), "--new", str(args.new),
               "--threads", str(args.threads), "--model", args.model, "--fill", args.fill]
        out[policy] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    full = out.get("full")
    ref = None if full is None else full["tokens"]
    for rec in out.values():
        rec["added_vs_full"] = None if not full else round(rec["added_bytes"] / full["added_bytes"], 3)
        rec["tokens_match_full"] = None if ref is None else rec["tokens"] == ref
    for rec in out.values():
        rec.pop("tokens")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["speed", "rss", "one-rss"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--tokens", type=int, default=7500)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fill", choices=["model", "random"], default="model")
    args = ap.parse_args()
    result = {"speed": speed, "rss": rss_all, "one-rss": one_rss}[args.mode](args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
