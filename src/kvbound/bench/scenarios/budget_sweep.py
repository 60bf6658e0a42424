"""``budget-sweep``: every policy x budget x prompt, greedy, scored against ``full`` on the same
prompt (token match, KL, memory by tier, RSS, time per token)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from ...cache import make_cache
from ...cache.base import KVBoundCache
from .. import metrics
from ..inputs import Budget, Prompt, load_prompts
from ..render import (
    REFERENCE,
    MiB,
    fmt,
    label_key,
    legend,
    line_styles,
    meta_section,
    mib,
    ok_runs,
    pct,
    policy_order,
    problems,
    pyplot,
    table,
    times,
)
from ..runner import (
    Bench,
    Context,
    Decoded,
    _cache_for,
    _close,
    _failure,
    _memory,
    _seed,
    decode,
    encode_prompt,
    spec,
)

DEFAULT_BUDGETS = "64,256"
DEFAULT_NEW_TOKENS = 16

SUMMARY = "token match, KL, memory by tier, RSS and speed of every policy x budget x prompt"


def options(args) -> dict[str, Any]:
    return {"prompts": [p.name for p in load_prompts(args.prompt_file, args.prompts_dir)]}


def run(ctx: Context) -> None:
    budget_sweep(ctx.bench, load_prompts(ctx.args.prompt_file, ctx.args.prompts_dir), ctx.budgets)


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = _plots(data, out)
    return _markdown(data, plots), plots


def budget_sweep(bench: Bench, prompts: list[Prompt], budgets: list[Budget]) -> None:
    """Every policy x budget x prompt, greedy, scored against ``full`` on the same prompt.

    ``full`` runs once per prompt (its record has ``budget`` null); policies that need no budget
    also run once per prompt. ``mean_kl`` is teacher-forced on full's continuation: when a policy's
    greedy tokens equal full's, its greedy logits already are the teacher-forced ones; otherwise a
    fresh cache replays full's tokens (untimed).
    """
    others = [p for p in bench.policies if p != REFERENCE]
    per_prompt = 1 + sum(len(budgets) if spec(p).needs_budget else 1 for p in others)
    bar = bench.bar(len(prompts) * per_prompt, "budget-sweep")
    try:
        for prompt in prompts:
            ids = encode_prompt(bench.tokenizer, prompt, bench.device)
            context = ids.shape[1]
            bar.set_postfix_str(f"{prompt.name}: full")
            _seed(bench.seed)
            ref_cache = make_cache(bench.model, REFERENCE)
            ref = decode(bench.model, ids, ref_cache, bench.max_new_tokens, prefill_chunk=bench.prefill_chunk)
            ref_record = _sweep_record(bench, REFERENCE, None, None, prompt, context, ref, ref_cache, ref, 0.0)
            _close(ref_cache)
            bench.save_run(ref_record)
            bar.update()
            for budget in budgets:
                for policy in others:
                    if not spec(policy).needs_budget and budget is not budgets[0]:
                        continue
                    tokens = budget.tokens(context) if spec(policy).needs_budget else None
                    label = budget.label if spec(policy).needs_budget else None
                    bar.set_postfix_str(f"{prompt.name}: {policy} @ {label}")
                    bench.save_run(_sweep_one(bench, policy, tokens, label, prompt, context, ids, ref))
                    bar.update()
    finally:
        bar.close()


def _sweep_one(bench: Bench, policy: str, budget: int | None, label: str | None, prompt: Prompt,
               context: int, ids: torch.Tensor, ref: Decoded) -> dict[str, Any]:
    cache = forced_cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, budget)
        got = decode(bench.model, ids, cache, bench.max_new_tokens, prefill_chunk=bench.prefill_chunk)
        if got.tokens == ref.tokens:
            kl = metrics.mean_kl(ref.logits, got.logits)
        else:
            _seed(bench.seed)
            forced_cache = _cache_for(bench.model, policy, budget)
            forced = decode(bench.model, ids, forced_cache, bench.max_new_tokens, force=ref.tokens,
                            prefill_chunk=bench.prefill_chunk)
            kl = metrics.mean_kl(ref.logits, forced.logits)
        return _sweep_record(bench, policy, budget, label, prompt, context, got, cache, ref, kl)
    except Exception as exc:  # a policy that cannot run at this budget must not stop the bench
        status, reason = _failure(exc)
        return {"policy": policy, "exact": spec(policy).exact, "budget": budget, "budget_label": label,
                "prompt": prompt.name, "prompt_tokens": context, "status": status, "reason": reason}
    finally:
        _close(cache)
        _close(forced_cache)


def _sweep_record(bench: Bench, policy: str, budget: int | None, label: str | None, prompt: Prompt, context: int,
                  got: Decoded, cache: KVBoundCache, ref: Decoded, kl: float) -> dict[str, Any]:
    text = bench.tokenizer.decode(got.tokens, skip_special_tokens=True)
    return {
        "policy": policy,
        "exact": spec(policy).exact,
        "budget": budget,
        "budget_label": label,
        "prompt": prompt.name,
        "prompt_tokens": context,
        "new_tokens": len(got.tokens),
        "status": "ok",
        "token_match": metrics.token_match(ref.tokens, got.tokens),
        "prefix_match": metrics.prefix_match(ref.tokens, got.tokens),
        "first_divergence": metrics.first_divergence(ref.tokens, got.tokens),
        "mean_kl": kl,
        **_memory(cache),
        "peak_rss_bytes": got.peak_rss_bytes,
        "rss_added_bytes": got.rss_added_bytes,
        "prefill_seconds": got.prefill_seconds,
        "seconds_per_token": got.seconds_per_token,
        "time_ratio_vs_full": got.seconds_per_token / ref.seconds_per_token,
        "needle_found": (prompt.answer.lower() in text.lower()) if prompt.answer else None,
        "continuation": text,
    }




def sweep_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over prompts per (policy, budget label), with per-prompt ratios to ``full``."""
    ok = ok_runs(runs)
    ref = {r["prompt"]: r for r in ok if r["policy"] == REFERENCE}
    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = defaultdict(list)
    for r in ok:
        groups[(r["policy"], r.get("budget_label"))].append(r)
    rows = []
    for (policy, label), rs in groups.items():
        def avg(key):
            vals = [r[key] for r in rs if r.get(key) is not None]
            return mean(vals) if vals else None

        def ratio(key):
            vals = [r[key] / ref[r["prompt"]][key] for r in rs if r["prompt"] in ref and ref[r["prompt"]].get(key)]
            return mean(vals) if vals else None

        needles = [r["needle_found"] for r in rs if r.get("needle_found") is not None]
        rows.append({
            "policy": policy, "exact": rs[0].get("exact"), "budget_label": label, "prompts": len(rs),
            "budget_tokens": avg("budget"), "token_match": avg("token_match"), "prefix_match": avg("prefix_match"),
            "mean_kl": avg("mean_kl"), "peak_hot_kv_bytes": avg("peak_hot_kv_bytes"),
            "hot_ratio": ratio("peak_hot_kv_bytes"), "total_cache_bytes": avg("total_cache_bytes"),
            "total_ratio": ratio("total_cache_bytes"), "peak_transient_bytes": avg("peak_transient_bytes"),
            "seconds_per_token": avg("seconds_per_token"), "time_ratio_vs_full": avg("time_ratio_vs_full"),
            "rss_added_bytes": avg("rss_added_bytes"),
            "needles": f"{sum(needles)}/{len(needles)}" if needles else None,
        })
    order = {p: i for i, p in enumerate(policy_order(ok))}
    rows.sort(key=lambda r: (order[r["policy"]], label_key(r["budget_label"])))
    return rows


def _markdown(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    rows = sweep_summary(runs)
    labels = sorted({r["budget_label"] for r in rows if r["budget_label"] is not None}, key=label_key)
    fraction = any("." in lab for lab in labels)
    unit = "fraction of the prompt" if fraction else "tokens kept per layer"
    headline = []
    for policy in policy_order(ok_runs(runs)):
        mine = {r["budget_label"]: r for r in rows if r["policy"] == policy}
        exact = next(iter(mine.values()))["exact"]
        cells = [mine[None]["token_match"] if None in mine else mine.get(lab, {}).get("token_match") for lab in labels]
        headline.append([f"`{policy}`", "exact" if exact else "lossy", *[pct(c) for c in cells]])
    detail = [[f"`{r['policy']}`", r["budget_label"] or "–", r["prompts"], pct(r["token_match"]),
               pct(r["prefix_match"]), fmt(r["mean_kl"], 4), mib(r["peak_hot_kv_bytes"]), times(r["hot_ratio"]),
               mib(r["total_cache_bytes"]), times(r["total_ratio"]), mib(r["peak_transient_bytes"]),
               mib(r["rss_added_bytes"]), fmt(r["seconds_per_token"] and r["seconds_per_token"] * 1000, 1), times(r["time_ratio_vs_full"]),
               r["needles"] or "–"] for r in rows]
    prompts = sorted({(r["prompt"], r.get("prompt_tokens")) for r in runs if r["policy"] == REFERENCE})
    n_new = next((r.get("new_tokens") for r in ok_runs(runs)), "?")
    parts = [
        f"# kvbound bench: budget sweep\n\n{meta_section(data)}",
        "- **Prompts**: " + ", ".join(f"`{p}` ({t} tokens)" for p, t in prompts) + f"; {n_new} new tokens each, greedy",
        "\n## Token match with `full` (mean over prompts)\n\n"
        f"Budget = {unit}. Token match = fraction of the {n_new} greedy tokens equal to `full`'s at the same position.\n\n"
        + table(["policy", "kind", *labels], headline),
        "\n## Details\n\nMeans over prompts. `KL` = mean KL(full ‖ policy) in nats of the next-token distributions, "
        "teacher-forced on full's continuation. Memory columns are measured on the tensors held: "
        "`peak hot KV` = K/V held for attention; `cache` = all tiers at the end (hot K/V + checkpoints/offloaded...); "
        "`× full` = ratio to `full` on the same prompt. `RSS added` = the process's peak RSS during the run above "
        "its RSS at the start (high-water mark reset between runs; allocator residue of earlier runs can hide "
        "part of a run's growth, `--scenario long` runs each policy in a fresh process). `ms/token` = decode step time after the prefill; "
        "`time × full` = ratio to `full`'s measured in the same run. `needle` = continuations containing the "
        "prompt's needle answer.\n\n"
        + table(["policy", "budget", "prompts", "token match", "prefix match", "KL", "peak hot KV MiB", "× full",
                  "cache MiB", "× full", "transient MiB", "RSS added MiB", "ms/token", "time × full", "needle"], detail)
        + problems(runs, ["policy", "budget", "prompt"]),
    ]
    parts.append("\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots))
    return "\n".join(parts) + "\n"


def _plots(data: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()
    rows = sweep_summary(data["runs"])
    if not rows:
        return []
    model = data["meta"].get("model", {}).get("name", "?")
    labels = sorted({r["budget_label"] for r in rows if r["budget_label"] is not None}, key=label_key)
    fraction = any("." in lab for lab in labels)
    xlabel = "budget (fraction of the prompt kept per layer)" if fraction else "budget (tokens kept per layer)"
    written = []
    for key, fname, ylabel, title in [
        ("token_match", "token_match.png", "token match with full (%)", "Agreement with the uncompressed cache"),
        ("time_ratio_vs_full", "time_ratio.png", "decode time per token ÷ full's", "Decode speed relative to full"),
        ("peak_hot_kv_bytes", "hot_kv.png", "peak hot K/V (MiB)", "K/V held for attention"),
    ]:
        fig, ax = plt.subplots(figsize=(9, 4.8))
        order = policy_order(ok_runs(data["runs"]))
        styles = line_styles(order, {r["policy"]: bool(r["exact"]) for r in rows})
        for policy in order:
            mine = [r for r in rows if r["policy"] == policy]
            scale = 100 if key == "token_match" else (1 / MiB if key == "peak_hot_kv_bytes" else 1)
            style = styles[policy]
            if mine[0]["budget_label"] is None:  # full / budget-free policies: a horizontal reference line
                if mine[0][key] is not None:
                    ax.axhline(mine[0][key] * scale, color="black" if policy == REFERENCE else None, linestyle=":",
                               label=f"{policy} (no budget)")
                continue
            pts = [(float(r["budget_label"]), r[key] * scale) for r in mine if r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), label=policy, **style)
        if not fraction:
            ax.set_xscale("log", base=2)
            ax.set_xticks([float(x) for x in labels], labels)
        if key == "token_match":
            ax.set_ylim(-3, 103)
        if key == "time_ratio_vs_full":
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} -- {model}, mean over prompts")
        ax.grid(True, alpha=0.3)
        legend(ax)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


