"""``long``: every policy on one long prompt, each run in a fresh process (peak RSS of that run
alone, time to first token, decode time per token, token match with ``full``); the worker is
:mod:`kvbound.bench.long`. ``--model`` may list several models; ``--prefill-chunk`` and
``--one-shot-max`` compare chunked with one-shot prefill; ``--speculate K`` adds exact
self-speculative offload runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import KVBoundError
from .. import long as worker
from ..render import (
    REFERENCE,
    MiB,
    fmt,
    legend,
    line_styles,
    meta_section,
    mib,
    ok_runs,
    pct,
    policy_order,
    pyplot,
    table,
    times,
)
from ..runner import Context, positive_ints

NEEDS_MODEL = False
DEFAULT_BUDGETS = "512"

SUMMARY = "each policy on a long prompt in a fresh process: peak RSS, time to first token, decode speed"


def add_arguments(group) -> None:
    group.add_argument("--one-shot-max", type=int, default=8192, metavar="N",
                       help="long: also run full with one-shot prefill at lengths up to N, to compare prefill "
                            "times (default: 8192; 0 = never)")
    group.add_argument("--timeout", type=float, default=3600, metavar="S",
                       help="long: seconds one run (a fresh process) may take (default: 3600)")


def models(args) -> list[str]:
    return [m.strip() for m in args.model.split(",") if m.strip()]


def options(args) -> dict[str, Any]:
    if args.budget_list[0].is_fraction:
        raise KVBoundError("the long scenario needs budgets in tokens, e.g. --budgets 512")
    lengths = positive_ints(args.lengths, "lengths") if args.lengths else None
    jobs = worker.plan_jobs(models(args), lengths, args.policy_list, [int(b.value) for b in args.budget_list],
                            args.max_new_tokens, args.prefill_chunk, args.threads, args.one_shot_max, args.speculate)
    return {"models": models(args), "lengths": lengths, "prefill_chunk": args.prefill_chunk,
            "one_shot_max": args.one_shot_max, "speculate": args.speculate, "jobs": len(jobs)}


def run(ctx: Context) -> None:
    args = ctx.args
    jobs = worker.plan_jobs(models(args), ctx.options["lengths"], ctx.policies, [int(b.value) for b in ctx.budgets],
                            args.max_new_tokens, args.prefill_chunk, args.threads, args.one_shot_max, args.speculate)
    bar = ctx.bar(len(jobs), "long")
    try:
        worker.run_scenario(jobs, ctx.results, bar, args.timeout)
    finally:
        bar.close()


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = long_plots(data, out)
    return long_md(data, plots), plots


KEYS = ["model", "tokens", "policy", "budget", "chunk"]


def run_label(r: dict[str, Any]) -> str:
    """``policy``, with ``+speculateK`` and ``(one-shot)`` where they apply."""
    label = r["policy"] + (f"+speculate{r['speculate']}" if r.get("speculate") else "")
    return label + (" (one-shot prefill)" if r.get("chunk") is None else "")


def _chunk(r: dict[str, Any]) -> str:
    return "one-shot" if r.get("chunk") is None else str(r["chunk"])


def table_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """One row per finished run, as the README's long-context table shows them."""
    rows = []
    for r in ok_runs(runs):
        rows.append([r["model"], r["tokens"], f"`{run_label(r)}`", fmt(r.get("budget")), _chunk(r),
                     pct(r.get("token_match")) if r.get("token_match") is not None else "ref",
                     f"{r['peak_rss_bytes'] / MiB:.0f}", f"{r['rss_added_bytes'] / MiB:.0f}",
                     times(r.get("rss_added_ratio_vs_full")), mib(r["peak_hot_kv_bytes"]), mib(r["total_cache_bytes"]),
                     f"{r['prefill_seconds']:.1f}", f"{1000 * r['seconds_per_token']:.0f}",
                     times(r.get("decode_ratio_vs_full"))])
    return rows


HEADER = ["model", "prompt tokens", "policy", "budget", "prefill chunk", "token match vs full", "peak RSS (MiB)",
          "RSS added above loaded model (MiB)", "added ÷ full's", "peak hot K/V (MiB)", "cache total (MiB)",
          "time to first token (s)", "decode ms/token", "decode ÷ full's"]


def _models(runs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The models as the workers described them (first finished run of each)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in ok_runs(runs):
        if r.get("model_info") and r["model"] not in seen:
            seen[r["model"]] = r["model_info"]
    return list(seen.values()) or None


def long_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    parts = [
        "# kvbound bench -- long context", "", meta_section(data, _models(runs)), "",
        "Each run is a fresh process: it loads the model, lowers the RSS high-water mark to the loaded "
        "model's resident size, then prefills the prompt and decodes. *RSS added* = peak RSS minus that "
        "loaded size; *time to first token* includes every prefill chunk; decode ms/token is the mean "
        "after the first token. Ratios and token match are against `full` at the same length with the "
        "same prefill chunk (its one-shot row is compared with that chunked `full`). Timings on a shared "
        "CPU are noisy; ratios in one run are the comparable numbers.", "",
        table(HEADER, table_rows(runs)),
    ]
    one_shot = [r for r in ok_runs(runs) if r["policy"] == REFERENCE and r.get("chunk") is None
                and r.get("chunked_over_one_shot_prefill") is not None]
    if one_shot:
        parts += ["", "## Chunked vs one-shot prefill (`full`)", "",
                  table(["model", "prompt tokens", "one-shot prefill (s)", "chunked ÷ one-shot", "RSS added one-shot (MiB)",
                          "tokens equal"],
                         [[r["model"], r["tokens"], f"{r['prefill_seconds']:.1f}", times(r["chunked_over_one_shot_prefill"]),
                           f"{r['rss_added_bytes'] / MiB:.0f}", pct(r.get("token_match"))] for r in one_shot])]
    spec = [r for r in ok_runs(runs) if r.get("speculation")]
    if spec:
        parts += ["", "## Exact self-speculative decoding", "",
                  table(["model", "prompt tokens", "policy", "drafts accepted / verification", "decode ÷ full's"],
                         [[r["model"], r["tokens"], f"`{run_label(r)}`", f"{r['speculation']['mean_accepted']:.2f}",
                           times(r.get("decode_ratio_vs_full"))] for r in spec])]
    bad = [r for r in runs if r.get("status") != "ok"]
    if bad:
        parts += ["", "## Skipped / failed", "",
                  table([*KEYS, "status", "reason"],
                         [[*(fmt(r.get(k)) for k in KEYS), r.get("status", "?"), r.get("reason", "")] for r in bad])]
    parts += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def long_plots(data: dict[str, Any], out: Path) -> list[str]:
    plt = pyplot()
    runs = [r for r in ok_runs(data["runs"]) if r.get("chunk") is not None or r["policy"] != REFERENCE]
    written = []
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        labels = policy_order([{"policy": run_label(r)} for r in mine])
        styles = line_styles(labels, {run_label(r): bool(r.get("exact")) for r in mine})
        for key, scale, ylabel, name in [
            ("rss_added_bytes", 1 / MiB, "RSS added above the loaded model (MiB)", "rss"),
            ("decode_ratio_vs_full", 1, "decode time per token ÷ full's", "decode"),
        ]:
            fig, ax = plt.subplots(figsize=(9, 4.8))
            for label in labels:
                pts = sorted((r["tokens"], r[key] * scale) for r in mine if run_label(r) == label and r.get(key) is not None)
                if pts:
                    ax.plot(*zip(*pts), label=label, **styles[label])
            ax.set_xlabel("prompt tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{ylabel} -- {model}")
            ax.grid(True, alpha=0.3)
            legend(ax)
            fig.tight_layout()
            fname = f"long_{name}_{model}.png"
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            written.append(fname)
    return written
