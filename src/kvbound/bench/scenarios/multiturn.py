"""``multiturn``: a chat of ``--turns`` turns per policy through one cache object each (replies
equal to ``full``'s, cache bytes and RSS per turn)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ...errors import KVBoundError
from .. import metrics
from ..inputs import Conversation, load_messages
from ..render import (
    REFERENCE,
    MiB,
    fmt,
    legend,
    line_styles,
    meta_section,
    mib,
    ok_runs,
    policy_order,
    problems,
    pyplot,
    table,
    times,
)
from ..runner import (
    Bench,
    Context,
    _cache_for,
    _close,
    _failure,
    _memory,
    _seed,
    decode,
    spec,
)

DEFAULT_BUDGETS = "128"
DEFAULT_NEW_TOKENS = 16
DEFAULT_TURNS = 20

SUMMARY = "a chat through one cache per policy: replies equal to full's, cache bytes per turn"


def options(args) -> dict[str, Any]:
    args.turns = args.turns or DEFAULT_TURNS
    if args.turns < 1:
        raise KVBoundError(f"--turns must be >= 1, got {args.turns}")
    if args.budget_list[0].is_fraction:
        raise KVBoundError("multiturn needs a budget in tokens (the context grows each turn), e.g. --budgets 128")
    return {"turns": args.turns}


def run(ctx: Context) -> None:
    multiturn(ctx.bench, load_messages(), ctx.args.turns, int(ctx.budgets[0].value))


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = _plots(data, out)
    return _markdown(data, plots), plots


def multiturn(bench: Bench, messages: list[str], turns: int, budget: int) -> None:
    """A ``turns``-turn chat per policy, one cache object per policy across all turns.

    Every policy gets the same user messages; its history holds its *own* replies (what a user of
    that policy would see), so a lossy policy's later turns can drift further from ``full``'s.
    ``reply_matches_full`` compares the reply ids at the same turn. ``rss_bytes`` is the whole
    process (model weights and earlier policies' allocator residue included).
    """
    order = [REFERENCE] + [p for p in bench.policies if p != REFERENCE]
    full_replies: list[list[int]] = []
    bar = bench.bar(len(order) * turns, "multiturn")
    try:
        for policy in order:
            _multiturn_policy(bench, policy, messages, turns, budget, full_replies, bar)
    finally:
        bar.close()


def _multiturn_policy(bench: Bench, policy: str, messages: list[str], turns: int, budget: int,
                      full_replies: list[list[int]], bar) -> None:
    policy_spec = spec(policy)
    used_budget = budget if policy_spec.needs_budget else None
    summary: dict[str, Any] = {"policy": policy, "exact": policy_spec.exact, "budget": used_budget, "status": "ok"}
    eos = bench.model.generation_config.eos_token_id
    cache = None
    done = matched = 0
    first_bad: int | None = None
    peak_total = 0
    seconds = 0.0
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, used_budget)
        conv = Conversation(bench.tokenizer, bench.device, eos)
        for turn in range(turns):
            bar.set_postfix_str(f"{policy} turn {turn + 1}")
            ids = conv.add_user(messages[turn % len(messages)])
            t0 = time.perf_counter()
            got = decode(bench.model, ids, cache, bench.max_new_tokens, stop_at_eos=True, keep_logits=False,
                         prefill_chunk=bench.prefill_chunk)
            seconds += time.perf_counter() - t0
            text = conv.add_reply(got.tokens)
            if policy == REFERENCE:
                full_replies.append(got.tokens)
            same = got.tokens == full_replies[turn]
            matched += same
            if not same and first_bad is None:
                first_bad = turn + 1
            mem = _memory(cache)
            peak_total = max(peak_total, mem["total_cache_bytes"])
            gc.collect()
            record = {"turn": turn + 1, "policy": policy, "budget": used_budget, "context_tokens": len(conv.ids),
                      "hot_kv_bytes": mem["hot_kv_bytes"], "total_cache_bytes": mem["total_cache_bytes"],
                      "bytes_by_tier": mem["bytes_by_tier"], "rss_bytes": metrics.rss_bytes(),
                      "reply_tokens": len(got.tokens), "reply_matches_full": same, "reply": text}
            bench.results.add_turn(record)
            done += 1
            bar.update()
        summary.update(_memory(cache))
    except Exception as exc:
        summary["status"], summary["reason"] = _failure(exc)
        bar.update(turns - done)
    finally:
        _close(cache)
    summary.update(turns=done, replies_matching_full=matched, first_divergent_turn=first_bad,
                   peak_total_cache_bytes=peak_total, seconds=seconds)
    bench.save_run(summary)




def _markdown(data: dict[str, Any], plots: list[str]) -> str:
    runs, turns = data["runs"], data["turns"]
    ref_peak = next((r.get("peak_total_cache_bytes") for r in runs if r["policy"] == REFERENCE and r.get("status") == "ok"), None)
    last_rss = {}
    for t in turns:
        last_rss[t["policy"]] = t["rss_bytes"]
    rows = []
    for r in sorted(ok_runs(runs), key=lambda r: (r["policy"] != REFERENCE, r["policy"])):
        peak = r.get("peak_total_cache_bytes")
        rows.append([f"`{r['policy']}`", "exact" if r.get("exact") else "lossy", r.get("budget") or "–",
                     f"{r['replies_matching_full']}/{r['turns']}", r.get("first_divergent_turn") or "–",
                     mib(r.get("peak_hot_kv_bytes")), mib(peak), times(peak / ref_peak if ref_peak and peak else None),
                     mib(last_rss.get(r["policy"])), fmt(r.get("seconds"), 1)])
    n_turns = max((t["turn"] for t in turns), default=0)
    text = [
        f"# kvbound bench: multi-turn chat\n\n{meta_section(data)}",
        f"\n{n_turns} turns through the chat template. Every policy gets the same user messages; each policy's "
        "history holds its *own* earlier replies (so after a lossy policy's first wrong reply, later turns compare "
        "different conversations). One cache object per policy lives across all turns. `cache` = all tiers measured "
        "on the tensors held; RSS is the whole process (model weights and earlier policies' allocator residue "
        "included), so compare cache bytes, not RSS, between policies.\n",
        table(["policy", "kind", "budget", "replies = full", "first different turn", "peak hot KV MiB",
                "peak cache MiB", "× full", "RSS at end MiB", "seconds"], rows),
        problems(runs, ["policy", "budget"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(text) + "\n"


def _plots(data: dict[str, Any], out: Path) -> list[str]:
    turns = data["turns"]
    if not turns:
        return []
    plt = pyplot()
    exact = {r["policy"]: bool(r.get("exact")) for r in data["runs"]}
    model = data["meta"].get("model", {}).get("name", "?")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    order = policy_order(turns)
    styles = line_styles(order, exact)
    for policy in order:
        mine = [t for t in turns if t["policy"] == policy]
        style = styles[policy]
        xs = [t["turn"] for t in mine]
        axes[0].plot(xs, [t["total_cache_bytes"] / MiB for t in mine], label=policy, **style)
        axes[1].plot(xs, [t["hot_kv_bytes"] / MiB for t in mine], label=policy, **style)
    from matplotlib.ticker import MaxNLocator

    for ax, what in zip(axes, ["cache bytes, all tiers", "hot K/V bytes"]):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("turn")
        ax.set_ylabel(f"{what} (MiB)")
        ax.grid(True, alpha=0.3)
    axes[0].set_title(f"Cache memory over a chat -- {model}")
    axes[1].set_title("K/V held for attention")
    legend(axes[1])
    fig.tight_layout()
    fig.savefig(out / "cache_bytes.png", dpi=110)
    plt.close(fig)
    return ["cache_bytes.png"]


