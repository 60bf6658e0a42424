"""``recompute-error``: K/V rebuilt by the recomputing policies (``kv-direct``, ``residual``) against
the K/V ``full`` cached for the same tokens: largest |dK|, |dV| over the rebuilt layers and tokens,
and whether they are bit-equal, once with the same row grouping as the original forward pass and
once as a prefix of a longer prefill (the grouping differs: floating-point sums differ in the last bits)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...cache import make_cache
from ..inputs import haystack_ids
from ..render import fmt, meta_section, ok_runs, problems, table
from ..runner import Context, _cache_for, _close, _failure, positive_ints, spec

DEFAULT_LENGTHS = "200"  # tokens in the rebuilt span (at least 137: the prompt ends in a question)
DEFAULT_BUDGETS = "64"

SUMMARY = "K/V rebuilt by kv-direct / residual vs full's cached K/V, bit for bit"


def options(args) -> dict[str, Any]:
    return {"lengths": positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths")}


@torch.no_grad()
def kv_error(model, chunks: list[torch.Tensor], policy: str, budget: int) -> dict[str, Any]:
    """Feed ``chunks`` to ``full`` and ``policy``; compare the K/V ``policy`` rebuilt in the last chunk."""
    full = make_cache(model, "full")
    cache = make_cache(model, policy, budget=budget)
    got: list[tuple] = []  # (layer index, start, end, K, V) of every span rebuilt in the last chunk
    depth = [0]

    def capture(inner, layer_of):
        def wrapped(layer, start, end, *rest):
            depth[0] += 1
            try:
                k, v = inner(layer, start, end, *rest)
            finally:
                depth[0] -= 1
            if depth[0] == 0:  # rebuild may call project: count the outer call only
                got.append((layer_of(layer), start, end, k.clone(), v.clone()))
            return k, v

        return wrapped

    for method in ("rebuild", "project"):  # project: residual's lazy blocks under tiered attention
        if hasattr(cache, method):
            setattr(cache, method, capture(getattr(cache, method), lambda layer: layer.layer_idx))
    try:
        for chunk in chunks:
            model(chunk, past_key_values=full)
            got.clear()
            model(chunk, past_key_values=cache)
    finally:
        _close(cache)
    dk = dv = 0.0
    equal = True
    for idx, start, end, k, v in got:
        ref_k, ref_v = full.layers[idx].keys[..., start:end, :], full.layers[idx].values[..., start:end, :]
        dk = max(dk, (k - ref_k).abs().max().item())
        dv = max(dv, (v - ref_v).abs().max().item())
        equal = equal and torch.equal(k, ref_k) and torch.equal(v, ref_v)
    span = [min(g[1] for g in got), max(g[2] for g in got)] if got else None
    return {"rebuilt_layers": len({g[0] for g in got}), "span": span, "max_abs_dK": dk, "max_abs_dV": dv, "equal": equal if got else None}


def _rebuilds(model, policy: str) -> bool:
    """Whether ``policy``'s cache rebuilds evicted K/V (the policies this scenario checks)."""
    try:
        cache = _cache_for(model, policy, 64)
    except Exception:  # noqa: BLE001 -- a policy that cannot even be built does not rebuild K/V
        return False
    try:
        return hasattr(cache, "rebuild") or hasattr(cache, "project")
    finally:
        _close(cache)


def run(ctx: Context) -> None:
    bench = ctx.bench
    policies = [p for p in ctx.policies if p != "full" and spec(p).needs_budget and _rebuilds(bench.model, p)]
    cells = [(n, b.tokens(n), p) for n in ctx.options["lengths"] for b in ctx.budgets for p in policies]
    bar = ctx.bar(2 * len(cells), "recompute-error")
    try:
        for span, budget, policy in cells:
            ids = haystack_ids(bench.tokenizer, span + budget + 1)[0].to(bench.device)
            groupings = {"same rows": [ids[:, :span], ids[:, span:span + budget], ids[:, span + budget:]],
                         "prefix of a longer prefill": [ids[:, :span + budget], ids[:, span + budget:]]}
            for grouping, chunks in groupings.items():
                record: dict[str, Any] = {"policy": policy, "budget": budget, "tokens": span, "grouping": grouping,
                                          "status": "ok"}
                try:
                    record.update(kv_error(bench.model, chunks, policy, budget))
                except Exception as exc:
                    record["status"], record["reason"] = _failure(exc)
                ctx.save_run(record)
                bar.update()
    finally:
        bar.close()


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    rows = [[f"`{r['policy']}`", r["budget"], r["grouping"], r.get("span"), r.get("rebuilt_layers"),
             f"{r['max_abs_dK']:.3g}", f"{r['max_abs_dV']:.3g}", fmt(r["equal"]) if r["equal"] is not None else "nothing rebuilt"] for r in ok_runs(data["runs"])]
    text = [f"# kvbound bench: recomputed vs cached K/V\n\n{meta_section(data)}",
            "\n`full` and the policy see the same token chunks; the K/V the policy rebuilds during the last chunk "
            "(tokens `span`) are compared with `full`'s cached K/V for those tokens, over every rebuilt layer.\n",
            table(["policy", "budget", "grouping", "span", "layers", "max abs dK", "max abs dV", "bit-equal"], rows),
            problems(data["runs"], ["policy", "budget", "grouping"])]
    return "\n".join(text) + "\n", []
