"""``report.md`` and the score-vs-ratio plot of ``kvbound bench --scenario ruler`` (from results.json only)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from .render import REFERENCE, fmt as _fmt, legend as _legend, meta_section as _meta_section, ok_runs as _ok, pyplot as _plt, problems as _problems, table as _table

PLOT = "ruler_score_vs_ratio.png"


def _scored(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The leaderboard's runs: ``full`` (not the exactness reference) and the lossy policies at a ratio."""
    return [r for r in _ok(data["runs"]) if r.get("role") is None]


def leaderboard(data: dict[str, Any]) -> dict[str, dict[float | None, float]]:
    """Mean score per policy and ratio over every task and sample (``full``: ratio ``None``)."""
    cells: dict[str, dict[float | None, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _scored(data):
        cells[r["policy"]][r["ratio"]].append(r["score"])
    return {p: {ratio: mean(v) for ratio, v in by.items()} for p, by in cells.items()}


def _order(policies) -> list[str]:
    names = sorted(policies)
    return ([REFERENCE] if REFERENCE in names else []) + [n for n in names if n != REFERENCE]


def ruler_md(data: dict[str, Any], plots: list[str]) -> str:
    opts = data["meta"].get("options", {})
    ratios = opts.get("ratios", [])
    scored = _scored(data)
    board = leaderboard(data)
    ceiling = board.get(REFERENCE, {}).get(None)
    header = ["method", *(f"ratio {r:g}" for r in ratios), "mean"]
    rows = []
    for p in _order(board):
        if p == REFERENCE:
            rows.append([f"`{p}` (ceiling)", *([_fmt(ceiling)] * len(ratios)), _fmt(ceiling)])
            continue
        vals = [board[p].get(r) for r in ratios]
        rows.append([f"`{p}`", *(_fmt(v) for v in vals), _fmt(mean(v for v in vals if v is not None))])

    tasks = opts.get("tasks", sorted({r["task"] for r in scored}))
    per_task = []
    for p in _order(board):
        for ratio in ([None] if p == REFERENCE else ratios):
            cells = [[r["score"] for r in scored if r["policy"] == p and r["ratio"] == ratio and r["task"] == t]
                     for t in tasks]
            per_task.append([f"`{p}`", "–" if ratio is None else f"{ratio:g}",
                             *(_fmt(mean(c)) if c else "–" for c in cells)])

    mem: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in _ok(data["runs"]):
        mem[(r["policy"], r["ratio"])].append(r)
    def most(rs: list[dict[str, Any]], key: str) -> str:  # batched answers have no peak of their own
        values = [x[key] for x in rs if x.get(key) is not None]
        return f"{max(values) / 2**20:.0f}" if values else "–"

    memory = [[f"`{p}`", "–" if ratio is None else f"{ratio:g}", f"{mean(x['held_kv_bytes'] for x in rs) / 2**20:.1f}",
               most(rs, "peak_rss_bytes"), most(rs, "rss_added_bytes"),
               _fmt(mean(x["seconds"] for x in rs), 1), len(rs)]
              for (p, ratio), rs in sorted(mem.items(), key=lambda kv: (kv[0][0] != REFERENCE, kv[0][0], kv[0][1] or 0))]

    exact = [r for r in _ok(data["runs"]) if r.get("role") == "exact check"]
    exact_md = ""
    if exact:
        exact_md = "\n\n## Exact policies (once per sample, bounded at the smallest keep)\n\n" + _table(
            ["policy", "task", "sample", "keep", "identical to full", "score"],
            [[f"`{r['policy']}`", r["task"], r["sample"], r["keep"], _fmt(r.get("identical_to_full")), _fmt(r["score"])]
             for r in exact])
    prefills = data.get("extra", {}).get("shared_prefills") or data.get("shared_prefills") or []
    shared = ""
    if prefills:
        shared = (f"\n\nShared context prefills: {len(prefills)}, mean {mean(p['seconds'] for p in prefills):.1f} s "
                  f"for {mean(p['context_tokens'] for p in prefills):.0f} context tokens.")
    n_samples = len({(r["task"], r["sample"], r["length"]) for r in scored})
    lines = [
        f"# RULER ({opts.get('protocol', '?')} protocol)",
        "",
        f"Lengths {opts.get('lengths')}, {n_samples} samples over {len(tasks)} tasks ({', '.join(tasks)}). "
        "Score: RULER's string_match_all in [0, 1] (x100 in RULER's tables); ratio = fraction of the context "
        "removed (keep = (1 - ratio) x context tokens per layer and KV head)." + shared,
        "",
        "## Leaderboard (mean score over every task and sample)",
        "",
        _table(header, rows),
        "",
        *(f"![score vs ratio]({p})" for p in plots),
        "",
        "## Per task",
        "",
        _table(["method", "ratio", *tasks], per_task),
        "",
        "## Memory and time per run (mean over samples)",
        "",
        "`held KV` is the K/V the policy held after the context (compress: after compression); `peak RSS` the "
        "process's peak during the run (model weights included), `added` its rise above the run's start. "
        "With batched answers (`--answers batched`, the default under compress) the compressed copies of a "
        "sample answer together in packed forward passes: a run's `added` is then its compression's own, its "
        "`seconds` its compression plus its share of the batch, and its peak is the batch's (listed below)." +
        _batches(data),
        "",
        _table(["method", "ratio", "held KV MiB", "peak RSS MiB", "added MiB", "seconds", "runs"], memory),
        exact_md,
        _problems(data["runs"], ["policy", "task", "sample", "ratio"]),
        "",
        _meta_section(data),
    ]
    return "\n".join(lines) + "\n"


def _batches(data: dict[str, Any]) -> str:
    batches = data.get("extra", {}).get("answer_batches") or []
    if not batches:
        return ""
    return (f" Answer batches: {len(batches)}, mean {mean(b['rows'] for b in batches):.1f} rows, "
            f"mean {mean(b['seconds'] for b in batches):.1f} s, peak RSS up to "
            f"{max(b['peak_rss_bytes'] for b in batches) / 2**20:.0f} MiB.")


def ruler_plots(data: dict[str, Any], out: Path) -> list[str]:
    board = leaderboard(data)
    ratios = data["meta"].get("options", {}).get("ratios", [])
    if not board or not ratios:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for p in _order(board):
        if p == REFERENCE:
            if None in board[p]:
                ax.axhline(board[p][None], color="black", linestyle=":", label=f"{p} (ceiling)")
            continue
        xs = [r for r in ratios if r in board[p]]
        ax.plot(xs, [board[p][r] for r in xs], marker="o", linestyle="--", label=p)
    opts = data["meta"].get("options", {})
    ax.set_xlabel("compression ratio (fraction of the context removed)")
    ax.set_ylabel("RULER score (mean)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"RULER {opts.get('lengths')} tokens, {opts.get('protocol')} protocol, "
                 f"{data['meta'].get('model', {}).get('name', '?')}", fontsize=9)
    ax.grid(alpha=0.3)
    _legend(ax)
    fig.tight_layout()
    fig.savefig(out / PLOT, dpi=120)
    plt.close(fig)
    return [PLOT]
