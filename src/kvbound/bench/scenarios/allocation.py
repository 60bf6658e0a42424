"""``allocation``: budgets over layers and heads at equal bytes (:mod:`kvbound.cache.allocation`).

Each variant is a policy with options in the bench's variant syntax (``snapkv``,
``snapkv:allocation=ada``, ``snapkv:allocation=pyramid``, ``razor:fraction=0.15``). Every run is a
fresh process (:func:`kvbound.bench.long.spawn`: the haystack prompt with its needle, RSS of the
process, decode time per token, the bytes held, the tokens each KV head kept), at every
``--lengths`` x ``--budgets`` (a fraction in (0, 1] is that share of the prompt).
``--rounds N`` runs every variant N times, round after round, the order reversed in every other
round (so a drift in the box's load, or a cost of running first or last, touches every variant
alike), and the page adds the median of each measure, its ratio of medians, and the median of the
per-round ratios (each variant against the first variant's run of the same round): the RSS a process
adds moves by several MiB between identical runs (the allocator's heap), and a decode of a few dozen
tokens by 10-20%, so a ratio of one run each is noise at the 10% level. ``--perplexity-tokens N`` also measures the perplexity of each variant over the first N tokens of the
built-in corpus (in the bench process). The page shows ratios against the first variant of each
length and budget, and one heatmap per run (layer x KV head, tokens kept).
"""

from __future__ import annotations

import os
import time
from statistics import median
from pathlib import Path
from typing import Any

from ...errors import KVBoundError
from ..render import meta_section
from ..runner import Context, policy_name, policy_options, positive_ints

NEEDS_MODEL = False
DEFAULT_BUDGETS = "512"

SUMMARY = "per-layer / per-head budgets (uniform, pyramid, ada, cake, razor) at equal bytes: bytes, RSS, speed, heatmaps"


def add_arguments(group) -> None:
    group.add_argument("--perplexity-tokens", type=int, default=0, metavar="N",
                       help="allocation: also the perplexity of each variant over N corpus tokens (default: 0 = no)")


def options(args) -> dict[str, Any]:
    if args.perplexity_tokens < 0:
        raise KVBoundError(f"--perplexity-tokens must be >= 0, got {args.perplexity_tokens}")
    if args.rounds < 1:
        raise KVBoundError(f"--rounds must be >= 1, got {args.rounds}")
    lengths = positive_ints(args.lengths, "lengths") if args.lengths else [7500]
    return {"model": args.model, "variants": args.policy_list, "lengths": lengths,
            "budgets": [b.value for b in args.budget_list], "new_tokens": args.new_tokens or 16,
            "prefill_chunk": args.prefill_chunk, "threads": args.threads, "perplexity_tokens": args.perplexity_tokens,
            "rounds": args.rounds}


def run(ctx: Context) -> None:
    from ..long import LongJob, spawn

    o, out = ctx.options, ctx.results.dir
    for tokens in o["lengths"]:
        for b in o["budgets"]:
            budget = int(b * tokens) if b <= 1 else int(b)
            for round_ in range(o.get("rounds", 1)):
                for variant in (o["variants"] if round_ % 2 == 0 else o["variants"][::-1]):
                    policy = policy_name(variant)
                    job = LongJob(o["model"], policy, tokens, None if policy == "full" else budget, o["new_tokens"],
                                  o["prefill_chunk"], o["threads"], policy_options(variant))
                    load_before = os.getloadavg()[0]
                    record = spawn(job, getattr(ctx.args, "timeout", 3600))
                    record.update(variant=variant, budget_arg=b, round=round_, loadavg_before=load_before,
                                  loadavg_after=os.getloadavg()[0])
                    record.pop("token_ids", None)
                    if record.get("kept_tokens") and policy != "full" and round_ == 0:
                        name = (f"heatmap-{variant.replace(':', '_').replace('=', '-').replace(',', '_')}"
                                f"-{tokens}-{budget}.png")
                        heatmap(record["kept_tokens"], out / name, f"{variant}, {tokens} tokens, budget {budget}")
                        record["heatmap"] = name
                    ctx.save_run(record)
    if o["perplexity_tokens"]:
        variants = [v for v in o["variants"] if policy_name(v) != "full"]
        budgets = [b for b in o["budgets"] if b > 1]
        ctx.results.set_extra("perplexity", _perplexity(o["model"], variants, budgets, o["perplexity_tokens"],
                                                        o["threads"]))


def heatmap(kept: list[list[int]], path: Path, title: str) -> None:
    """Tokens kept per (layer, KV head) as a PNG (rows: layers, bottom first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in kept if r]
    fig, ax = plt.subplots(figsize=(2 + 0.5 * max(len(r) for r in rows), 1.5 + 0.18 * len(rows)))
    im = ax.imshow(rows, aspect="auto", origin="lower", cmap="viridis")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="tokens kept")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def _perplexity(model_name: str, variants: list[str], budgets: list[float], tokens: int, threads: int | None
                ) -> list[dict[str, Any]]:
    import torch

    from ...cache import make_cache
    from ...models import load
    from ...quality.corpus import book_text
    from ...quality.perplexity import perplexity

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load(model_name)
    ids = tokenizer(book_text(), return_tensors="pt")["input_ids"][:, :tokens]
    out = []
    for budget in budgets:
        for variant in variants:
            start = time.perf_counter()
            cache = make_cache(model, policy_name(variant), int(budget), **policy_options(variant))
            result = perplexity(model, ids, cache)
            out.append({"variant": variant, "budget": int(budget), "tokens": ids.shape[-1],
                        "perplexity": result.perplexity, "seconds": time.perf_counter() - start,
                        "hot_kv_bytes": cache.memory_report()["hot_kv_bytes"]})
    return out


MEDIAN_KEYS = (("hot_kv_bytes", "hot K/V bytes"), ("rss_added_bytes", "RSS added"),
               ("cpu_seconds_per_token", "decode CPU s/token"), ("prefill_cpu_seconds", "prefill CPU s"))


def _round_key(r: dict[str, Any]) -> tuple[Any, Any, Any]:
    return r.get("tokens"), r.get("budget_arg"), r.get("round", 0)


def _references(runs: list[dict[str, Any]]) -> dict[tuple[Any, Any, Any], dict[str, Any]]:
    """The run each ratio is taken against: the first variant's (the order ``--policies`` named, not
    the order a round ran in) at the same length, budget and round."""
    first: dict[tuple[Any, Any], str] = {}
    for r in runs:
        first.setdefault((r.get("tokens"), r.get("budget_arg")), r.get("variant"))
    return {_round_key(r): r for r in runs
            if r.get("status") == "ok" and r.get("variant") == first[(r.get("tokens"), r.get("budget_arg"))]}


def _medians(runs: list[dict[str, Any]]) -> list[str]:
    """With several rounds: the median of each measure per variant, its ratio to the first variant's
    median at the same length and budget, and the median of the per-round decode ratios."""
    groups: dict[tuple[Any, Any], dict[str, list[dict[str, Any]]]] = {}
    for r in runs:
        if r.get("status") == "ok":
            groups.setdefault((r.get("tokens"), r.get("budget_arg")), {}).setdefault(r["variant"], []).append(r)
    if not any(len(v) > 1 for g in groups.values() for v in g.values()):
        return []
    refs = _references(runs)
    head = " | ".join(f"{label} | × first" for _, label in MEDIAN_KEYS)
    lines = ["", "## Medians over rounds", "",
             "Each measure's median over the rounds, and its ratio to the first variant's median. The last "
             "column is the median, over the rounds, of the decode CPU time per token against the first "
             "variant's run of the same round (min-max in brackets).", "",
             f"| tokens | budget | variant | runs | {head} | decode × first, per round |",
             "|---|---|---|---|" + "---|---|" * len(MEDIAN_KEYS) + "---|"]
    for (tokens, budget), by_variant in groups.items():
        ref = None
        for variant, rs in by_variant.items():
            med = {k: median(r[k] for r in rs) for k, _ in MEDIAN_KEYS}
            ref = ref or med
            cells = []
            for k, _ in MEDIAN_KEYS:
                value = f"{med[k] / 2**20:.1f} MiB" if k == "rss_added_bytes" else (
                    f"{med[k]:,.0f}" if k == "hot_kv_bytes" else f"{med[k]:.4g}")
                cells.append(f"{value} | {med[k] / ref[k]:.3f}" if ref[k] else f"{value} | —")
            paired = [r["cpu_seconds_per_token"] / ref_run["cpu_seconds_per_token"] for r in rs
                      if (ref_run := refs.get(_round_key(r))) and ref_run.get("cpu_seconds_per_token")]
            per_round = f"{median(paired):.3f} ({min(paired):.3f}–{max(paired):.3f})" if paired else "—"
            lines.append(f"| {tokens} | {rs[0].get('budget')} | {variant} | {len(rs)} | {' | '.join(cells)} | {per_round} |")
    return lines


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    """One row per run, ratios against the first variant at the same length and budget; the heatmaps."""
    runs = data.get("runs", [])
    model = data["meta"].get("options", {}).get("model") or data["meta"].get("model", "?")
    lines = [f"# Allocation bench: {model}", "", meta_section(data), "",
             "Decode CPU s/token is the process's CPU time per decoded token: on a shared box the wall time "
             "(s/token) mostly measures how much of a core the run got.", "",
             "The ratios (× first) are against the first variant's run of the same round.", "",
             "| tokens | budget | variant | needle | hot K/V bytes | × first | RSS added | × first | decode s/token "
             "| decode CPU s/token | × first | prefill CPU s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    refs = _references(runs)
    plots = []
    for r in runs:
        if r.get("status") != "ok":
            lines.append(f"| {r.get('tokens')} | {r.get('budget')} | {r.get('variant')} | error: {r.get('reason')} |"
                         " | | | | | | | | |")
            continue
        ref = refs.get(_round_key(r), r)

        def ratio(k: str) -> str:
            return f"{r[k] / ref[k]:.3f}" if ref.get(k) else "—"

        lines.append(f"| {r['tokens']} | {r.get('budget')} | {r['variant']} | {r.get('needle_found')} | "
                     f"{r['hot_kv_bytes']:,} | {ratio('hot_kv_bytes')} | {r['rss_added_bytes'] / 2**20:.1f} MiB | "
                     f"{ratio('rss_added_bytes')} | {r['seconds_per_token']:.3f} | {r['cpu_seconds_per_token']:.4f} | "
                     f"{ratio('cpu_seconds_per_token')} | {r['prefill_cpu_seconds']:.1f} | {r.get('loadavg_before', 0):.1f} |")
        if r.get("kept_tokens") and r.get("heatmap"):
            heatmap(r["kept_tokens"], out / r["heatmap"], f"{r['variant']}, {r['tokens']} tokens, budget {r.get('budget')}")
            plots.append(r["heatmap"])
    lines += _medians(runs)
    ppl = data.get("extra", {}).get("perplexity") or data["meta"].get("perplexity")
    if ppl:
        lines += ["", "## Perplexity (built-in corpus)", "", "| budget | variant | tokens | perplexity | hot K/V bytes |",
                  "|---|---|---|---|---|"]
        for p in ppl:
            lines.append(f"| {p['budget']} | {p['variant']} | {p['tokens']} | {p['perplexity']:.3f} | "
                         f"{p['hot_kv_bytes']:,} |")
    if plots:
        lines += ["", "## Tokens kept per layer and KV head", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n", plots
