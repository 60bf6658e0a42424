"""``decode``: decode time per token of every policy (or variant) after the same long prompt,
stepped round-robin in one process so machine load falls on all alike; ratio to ``full``'s in the
same run, token match with ``full``, where the time goes (offload store reads, K/V rebuilds) and
memory by tier. ``--speculate K`` adds each exact policy with exact self-speculative decoding.

This one scenario covers what several scripts measured: exact decoding speed with and without
speculation, the K/V-Direct rebuild cost, quantized/codec'd K/V decode (``--policies
full,kivi:bits=4,offload:codec=int8``), offload with its store dropped from the page cache
(``--cold-store``), and decoding from a random stand-in K/V on an overloaded machine (``--fill random``).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ...errors import KVBoundError
from ...generation import prefill
from ..inputs import haystack_ids
from ..render import REFERENCE, fmt, meta_section, mib, ok_runs, pct, problems, table, times
from ..runner import Context, _cache_for, _close, _failure, _memory, _seed, positive_ints, reference_first, spec

DEFAULT_LENGTHS = "2048"
DEFAULT_BUDGETS = "512"
DEFAULT_NEW_TOKENS = 16

SUMMARY = "decode time per token, round-robin, with rebuild / store-read shares and --speculate"


def add_arguments(group) -> None:
    group.add_argument("--draft", default="streaming",
                       help="decode --speculate: the lossy draft policy (default: streaming)")
    group.add_argument("--cold-store", action="store_true",
                       help="decode: offload variants also take a step right after their store files were dropped "
                            "from the OS page cache (reads from disk)")
    group.add_argument("--fill", choices=("model", "random"), default="model",
                       help="decode: prefill with the model (default) or give every layer the same seeded random K/V "
                            "(fast on an overloaded machine; decode cost depends on what the cache holds)")


def options(args) -> dict[str, Any]:
    lengths = positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths")
    if min(lengths) < 2:
        raise KVBoundError("decode needs prompts of at least 2 tokens")
    return {"lengths": lengths, "speculate": args.speculate, "draft": args.draft, "cold_store": args.cold_store,
            "fill": args.fill, "prefill_chunk": args.prefill_chunk}


class _Timed:
    """Adds up the seconds a cache spends in ``rebuild`` (K/V-Direct, residual) and its layers in
    ``recall`` (offload store reads): the instance's methods are wrapped, nothing else changes."""

    def __init__(self, cache) -> None:
        self.rebuild = self.read = 0.0
        self._depth = 0  # only the outermost timed call counts (recall_blocks may call recall)
        rebuilds = [m for m in ("rebuild", "project") if hasattr(cache, m)]  # project: residual's lazy blocks
        for method in rebuilds:  # the layers' recall is the rebuild: counted once
            setattr(cache, method, self._wrap(getattr(cache, method), "rebuild"))
        if rebuilds:
            return
        for layer in getattr(cache, "layers", []):
            for method in ("recall", "recall_blocks"):
                if hasattr(layer, method):
                    setattr(layer, method, self._wrap(getattr(layer, method), "read"))

    def _wrap(self, inner, what: str):
        def timed(*args, **kwargs):
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    setattr(self, what, getattr(self, what) + time.perf_counter() - t0)

        return timed


@torch.no_grad()
def _fill_random(model, cache, n: int, chunk: int) -> None:
    """``n`` tokens of seeded random K/V into every layer, ``chunk`` per update (scored policies rank
    with their own keys as stand-in queries)."""
    cfg = model.config.get_text_config(decoder=True)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    for i, layer in enumerate(cache.layers):
        g = torch.Generator().manual_seed(i)
        k_all, v_all = (torch.randn(1, cfg.num_key_value_heads, n, head_dim, generator=g, dtype=model.dtype)
                        for _ in range(2))
        for start in range(0, n, chunk):
            k, v = k_all[..., start:start + chunk, :], v_all[..., start:start + chunk, :]
            rows = layer.query_rows(k.shape[-2]) if hasattr(layer, "query_rows") and not layer.is_sliding else 0
            if rows:
                layer.pending_query = k[..., -rows:, :].repeat_interleave(groups, dim=1)
            cache.update(k, v, i)


class _Run:
    """One policy at one (length, budget): a prefilled cache, the next token, step times and tokens."""

    def __init__(self, ctx: Context, policy: str, budget: int | None, ids: torch.Tensor) -> None:
        self.policy, self.budget = policy, budget
        bench = ctx.bench
        _seed(bench.seed)
        self.cache = _cache_for(bench.model, policy, budget)
        self.timer = _Timed(self.cache)
        t0, c0 = time.perf_counter(), time.process_time()
        if ctx.options["fill"] == "random":
            _fill_random(bench.model, self.cache, ids.shape[1] - 1, bench.prefill_chunk)
        else:
            prefill(bench.model, ids[:, :-1], self.cache, bench.prefill_chunk)
        self.prefill_seconds, self.prefill_cpu = time.perf_counter() - t0, time.process_time() - c0
        self.timer.rebuild = self.timer.read = 0.0  # decode steps only from here
        self.next = ids[:, -1:]
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.cold: list[float] = []
        self.tokens: list[int] = []

    @torch.no_grad()
    def step(self, model, cold: bool) -> None:
        t0, c0 = time.perf_counter(), time.process_time()
        logits = model(input_ids=self.next, past_key_values=self.cache, use_cache=True).logits
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        self.next = logits[:, -1:].argmax(-1)
        self.tokens.append(int(self.next))
        if cold and hasattr(self.cache, "drop_page_cache"):
            self.cache.drop_page_cache()
            t0 = time.perf_counter()
            logits = model(input_ids=self.next, past_key_values=self.cache, use_cache=True).logits
            self.cold.append(time.perf_counter() - t0)
            self.next = logits[:, -1:].argmax(-1)
            self.tokens.append(int(self.next))

    def record(self, length: int, label: str | None) -> dict[str, Any]:
        steps = len(self.wall)
        return {"policy": self.policy, "exact": spec(self.policy).exact, "budget": self.budget, "budget_label": label,
                "tokens": length, "status": "ok", "speculate": None, "steps": steps, "token_ids": self.tokens,
                "prefill_seconds": self.prefill_seconds, "prefill_cpu_seconds": self.prefill_cpu,
                "seconds_per_token": statistics.median(self.wall),
                "cpu_seconds_per_token": sum(self.cpu) / steps, "mean_seconds_per_token": sum(self.wall) / steps,
                "cold_seconds_per_token": statistics.median(self.cold) if self.cold else None,
                "rebuild_seconds_per_token": self.timer.rebuild / steps,
                "read_seconds_per_token": self.timer.read / steps, **_memory(self.cache)}


def run(ctx: Context) -> None:
    bench = ctx.bench
    policies = reference_first(ctx.policies)
    cells = [(n, b) for n in ctx.options["lengths"] for b in ctx.budgets]
    bar = ctx.bar(len(cells) * len(policies), "decode")
    try:
        for n, budget in cells:
            ids = haystack_ids(bench.tokenizer, n)[0].to(bench.device)
            tokens = budget.tokens(ids.shape[1])
            runs: list[_Run] = []
            for policy in policies:
                if policy == REFERENCE and budget is not ctx.budgets[0]:
                    continue  # full needs no budget: once per length, the reference of every budget
                bar.set_postfix_str(f"{n}: prefill {policy}")
                try:
                    runs.append(_Run(ctx, policy, tokens if spec(policy).needs_budget else None, ids))
                except Exception as exc:  # a policy that cannot run here must not stop the bench
                    status, reason = _failure(exc)
                    ctx.save_run({"policy": policy, "budget": tokens, "tokens": n, "status": status, "reason": reason})
            bar.set_postfix_str(f"{n}: {len(runs)} policies round-robin")
            for _ in range(bench.max_new_tokens):
                for r in runs:
                    r.step(bench.model, ctx.options["cold_store"])
            ref = _reference(ctx, n)
            for r in runs:
                record = r.record(n, budget.label if r.budget is not None else None)
                _close(r.cache)
                if r.policy == REFERENCE and ref is None:
                    ref = record
                ctx.save_run(_compare(record, ref))
                bar.update()
            if ctx.options["speculate"]:
                for policy in policies:
                    if spec(policy).exact and policy != REFERENCE and spec(policy).needs_budget:
                        ctx.save_run(_compare(_speculative(ctx, policy, tokens, budget.label, ids), ref))
    finally:
        bar.close()


def _reference(ctx: Context, n: int) -> dict[str, Any] | None:
    return next((r for r in ctx.results.runs if r.get("policy") == REFERENCE and r.get("tokens") == n
                 and r.get("status") == "ok" and not r.get("speculate")), None)


def _compare(record: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    if record.get("status") != "ok" or ref is None:
        return record
    mine, theirs = record["token_ids"], ref["token_ids"]
    record["token_match"] = sum(a == b for a, b in zip(mine, theirs)) / max(1, min(len(mine), len(theirs)))
    record["time_ratio_vs_full"] = record["seconds_per_token"] / ref["seconds_per_token"]
    record["cpu_ratio_vs_full"] = record["cpu_seconds_per_token"] / ref["cpu_seconds_per_token"]
    return record


def _speculative(ctx: Context, policy: str, budget: int, label: str, ids: torch.Tensor) -> dict[str, Any]:
    """``policy`` decoding with exact self-speculation (after the round-robin, alone; CPU time)."""
    from ...speculative import speculative_greedy

    bench, k = ctx.bench, ctx.options["speculate"]
    record: dict[str, Any] = {"policy": policy, "exact": True, "budget": budget, "budget_label": label,
                              "tokens": ids.shape[1], "speculate": k, "draft": ctx.options["draft"], "status": "ok"}
    cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, budget)
        prefill(bench.model, ids[:, :-1], cache, bench.prefill_chunk)
        timer = _Timed(cache)
        t0, c0 = time.perf_counter(), time.process_time()
        new, stats = speculative_greedy(bench.model, ids, cache, draft=ctx.options["draft"], budget=budget, k=k,
                                        max_new_tokens=bench.max_new_tokens, prefill_chunk=bench.prefill_chunk)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = max(1, new.shape[1])
        record.update(steps=n, token_ids=new[0].tolist(), seconds_per_token=wall / n, cpu_seconds_per_token=cpu / n,
                      mean_accepted=stats.accepted / max(1, stats.verifications),
                      draft_time_share=stats.draft_seconds / max(1e-9, wall),
                      rebuild_seconds_per_token=timer.rebuild / n, read_seconds_per_token=timer.read / n,
                      **_memory(cache))
    except Exception as exc:
        record["status"], record["reason"] = _failure(exc)
    finally:
        _close(cache)
    return record


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    runs = data["runs"]
    rows = []
    for r in ok_runs(runs):
        spent = r.get("mean_seconds_per_token") or r["seconds_per_token"]
        where = ", ".join(f"{what} {pct(r[key] / spent)}" for what, key in
                          (("rebuild", "rebuild_seconds_per_token"), ("store reads", "read_seconds_per_token"))
                          if r.get(key))
        name = f"`{r['policy']}`" + (f" + speculate k={r['speculate']} (`{r.get('draft')}` draft)" if r.get("speculate") else "")
        rows.append([r["tokens"], name, r.get("budget") or "–", fmt(1000 * r["seconds_per_token"], 1),
                     times(r.get("time_ratio_vs_full")), fmt(1000 * r["cpu_seconds_per_token"], 1),
                     times(r.get("cpu_ratio_vs_full")),
                     fmt(r.get("cold_seconds_per_token") and 1000 * r["cold_seconds_per_token"], 1),
                     pct(r.get("token_match")) if r["policy"] != REFERENCE else "ref",
                     fmt(r.get("mean_accepted"), 2), where or "–", mib(r.get("peak_hot_kv_bytes")),
                     mib(r.get("total_cache_bytes")), mib(r.get("peak_transient_bytes")), fmt(r.get("prefill_seconds"), 1)])
    opts = data["meta"].get("options", {})
    text = [
        f"# kvbound bench: decode speed\n\n{meta_section(data)}",
        f"\nThe prompt (bundled passages repeated to the length) is prefilled {opts.get('prefill_chunk', '?')} tokens "
        f"per pass ({'seeded random K/V instead of the model' if opts.get('fill') == 'random' else 'the model'}); "
        "then the policies take greedy steps round-robin, one each in turn, so load from other processes falls on all "
        "alike. `ms/token` = median step (wall); `CPU ms/token` = mean process CPU time per step; ratios are to "
        "`full`'s at the same length in the same run. Speculative rows run alone after the round-robin "
        "(time per token over the whole call, drafts included). `where` = share of the (wall) time per token spent in "
        "K/V rebuilds / offload store reads. `cold` = a step right after the store files were dropped from the page "
        "cache. Memory columns are the cache's tensors at the end (MiB).\n",
        table(["tokens", "policy", "budget", "ms/token", "× full", "CPU ms/token", "CPU × full", "cold ms/token",
               "token match", "accepted / verification", "where", "peak hot K/V", "cache", "peak transient",
               "prefill s"], rows),
        problems(runs, ["policy", "budget", "tokens"]),
    ]
    return "\n".join(text) + "\n", []
