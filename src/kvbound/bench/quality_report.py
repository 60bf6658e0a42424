"""``report.md`` and plots for the ``perplexity`` and ``needle`` bench scenarios (from results.json only)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any

from .report import REFERENCE, _fmt, _label_key, _legend, _meta_section, _ok, _pct, _plt, _policy_order, _problems, _styles, _table


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({r["budget_label"] for r in runs if r.get("budget_label") is not None}, key=_label_key)


def _exact(runs: list[dict[str, Any]]) -> dict[str, bool]:
    return {r["policy"]: bool(r.get("exact")) for r in runs}


# --------------------------------------------------------------------------- perplexity


def best_lossy(runs: list[dict[str, Any]], key: str, higher_is_better: bool) -> dict[str, tuple[str, float]]:
    """Per budget label: the lossy policy (or policies tied, joined by " = ") with the best mean
    ``key``, and that value."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in _ok(runs):
        if not r.get("exact") and r.get("budget_label") is not None and r.get(key) is not None:
            groups[r["budget_label"]][r["policy"]].append(float(r[key]))
    best: dict[str, tuple[str, float]] = {}
    for label, by_policy in groups.items():
        means = {p: mean(v) for p, v in by_policy.items()}
        top = (max if higher_is_better else min)(means.values())
        tied = sorted(p for p, v in means.items() if abs(v - top) <= 1e-9)
        best[label] = ("` = `".join(tied), top)
    return best


def perplexity_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    ok = _ok(runs)
    labels = _labels(ok)
    opts = data["meta"].get("options", {})
    ref = next((r for r in ok if r["policy"] == REFERENCE), None)
    rows = []
    for policy in _policy_order(ok):
        mine = {r.get("budget_label"): r for r in ok if r["policy"] == policy}
        kind = "exact" if next(iter(mine.values())).get("exact") else "lossy"
        cells = []
        for label in labels:
            r = mine.get(label, mine.get(None))
            cells.append("–" if r is None else f"{r['perplexity']:.2f}" + (
                f" ({100 * (r['ppl_ratio_vs_full'] - 1):+.2f}%)" if r.get("ppl_ratio_vs_full") and policy != REFERENCE else ""))
        rows.append([f"`{policy}`", kind, *cells])
    detail = [[f"`{r['policy']}`", r.get("budget") or "–", f"{r['perplexity']:.4f}", _fmt(r["mean_nll"], 5),
               _fmt(r.get("ppl_ratio_vs_full"), 5), _fmt(r["seconds"], 1), _fmt(r.get("time_ratio_vs_full"), 2),
               f"{r['peak_hot_kv_bytes'] / 2**20:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}"] for r in ok]
    best = best_lossy(runs, "perplexity", higher_is_better=False)
    ranking = "\n".join(f"- budget {label}: `{p}` ({v:.2f})" for label, (p, v) in sorted(best.items(), key=lambda kv: _label_key(kv[0])))
    tokens = data["extra"].get("text_tokens", ref["tokens"] + 1 if ref else "?")
    parts = [
        f"# kvbound bench: perplexity vs budget\n\n{_meta_section(data)}",
        f"- **Text**: `{opts.get('text', '?')}`, first {tokens} tokens ({tokens - 1 if isinstance(tokens, int) else '?'} "
        f"scored); chunk {opts.get('chunk', '?')} tokens per forward pass",
        "\n## Perplexity (lower is better; change vs `full` in brackets)\n\n"
        f"Budget = tokens kept per layer. Chunk {opts.get('chunk', '?')}: a lossy policy at budget B predicts each token "
        f"from B..B+{opts.get('chunk', 1) - 1 if isinstance(opts.get('chunk'), int) else '?'} past tokens (chunk 1 = "
        "strict token-by-token); exact policies do not depend on the chunk.\n\n"
        + _table(["policy", "kind", *labels], rows),
        "\n**Lossy policy that loses least, per budget:**\n\n" + (ranking or "- (no lossy runs)"),
        "\n## Details\n\n`ppl ÷ full` = perplexity ratio to `full`; `time × full` = wall time ratio to `full`'s in the "
        "same run; `peak RSS` = the process high-water mark during the run (model weights included).\n\n"
        + _table(["policy", "budget", "perplexity", "mean NLL", "ppl ÷ full", "seconds", "time × full",
                  "peak hot KV MiB", "peak RSS MiB"], detail)
        + _problems(runs, ["policy", "budget"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(parts) + "\n"


def perplexity_plots(data: dict[str, Any], out: Path) -> list[str]:
    ok = _ok(data["runs"])
    labels = _labels(ok)
    if not ok or not labels:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    order = _policy_order(ok)
    styles = _styles(order, _exact(ok))
    for policy in order:
        mine = [r for r in ok if r["policy"] == policy]
        if mine[0].get("budget_label") is None:
            ax.axhline(mine[0]["perplexity"], color="black" if policy == REFERENCE else None, linestyle=":",
                       label=f"{policy} (no budget)")
            continue
        pts = sorted((float(r["budget_label"]), r["perplexity"]) for r in mine)
        ax.plot(*zip(*pts), label=policy, **styles[policy])
    fraction = any("." in lab for lab in labels)
    if not fraction:
        ax.set_xscale("log", base=2)
        ax.set_xticks([float(x) for x in labels], labels)
    ax.set_yscale("log")
    ax.set_xlabel("budget (fraction of the text kept per layer)" if fraction else "budget (tokens kept per layer)")
    ax.set_ylabel("perplexity (log scale)")
    opts = data["meta"].get("options", {})
    ax.set_title(f"Perplexity vs budget -- {data['meta'].get('model', {}).get('name', '?')}, {opts.get('text', '?')}, "
                 f"chunk {opts.get('chunk', '?')}", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    _legend(ax)
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)
    return ["perplexity.png"]


# --------------------------------------------------------------------------- needle


def _rerun_note(opts: dict[str, Any], ok: list[dict[str, Any]]) -> str:
    """Which (policy, length) cells ``--rerun-max-length`` left out, if any."""
    from ..cache.registry import rerunning_policies

    cap = opts.get("rerun_max_length") or 0
    rerunning = set(rerunning_policies())
    slow = [p for p in opts.get("policies", []) if p in rerunning]
    above = sorted(n for n in {r["length"] for r in ok} if n > cap
                   and not any(r["policy"] in slow and r["length"] == n for r in ok))
    if not cap or not slow or not above:
        return ""
    return (f"\n- **Not run**: {', '.join(f'`{p}`' for p in slow)} at lengths {above} (`--rerun-max-length {cap}`: it "
            "re-runs the model over the whole evicted span every step, so its time grows with the context; "
            "`--rerun-max-length 0` runs it everywhere)")


def _accuracy_rows(ok: list[dict[str, Any]], labels: list[str], key: str, values: list[Any]):
    """Per policy and budget: ``([policy, budget, accuracy for each of values of key...], runs)``."""
    for policy in _policy_order(ok):
        for label in ([None] if any(r["policy"] == policy and r.get("budget_label") is None for r in ok) else labels):
            rs = [r for r in ok if r["policy"] == policy and r.get("budget_label") == label]
            if rs:
                yield ([f"`{policy}`", label or "–",
                        *[_pct(mean(r["found"] for r in rs if r[key] == v)) if any(r[key] == v for r in rs) else "–"
                          for v in values]], rs)


def needle_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    ok = _ok(runs)
    labels = _labels(ok)
    opts = data["meta"].get("options", {})
    rows = []
    for policy in _policy_order(ok):
        mine = [r for r in ok if r["policy"] == policy]
        kind = "exact" if mine[0].get("exact") else "lossy"
        cells = []
        for label in labels:
            rs = [r for r in mine if r.get("budget_label") in (label, None)]
            if not rs:
                cells.append("–")
                continue
            same = [r["same_as_full"] for r in rs if r.get("same_as_full") is not None]
            cells.append(f"{_pct(mean(r['found'] for r in rs))} ({sum(same)}/{len(same)} = full)")
        rows.append([f"`{policy}`", kind, *cells])
    by_kind = [row + [_fmt(mean(r["seconds"] for r in rs), 1)]
               for row, rs in _accuracy_rows(ok, labels, "kind", opts.get("kinds", []))]
    best = best_lossy(runs, "found", higher_is_better=True)
    ranking = "\n".join(f"- budget {label}: `{p}` ({_pct(v)})" for label, (p, v) in sorted(best.items(), key=lambda kv: _label_key(kv[0])))
    lengths = sorted({r["length"] for r in ok})
    by_length = [row for row, _ in _accuracy_rows(ok, labels, "length", lengths)]
    parts = [
        f"# kvbound bench: needle retrieval\n\n{_meta_section(data)}",
        f"- **Tasks**: {', '.join(opts.get('kinds', []))} (RULER-style, built in code); lengths "
        f"{opts.get('lengths')} tokens; depths {opts.get('depths')}; prompt prefilled {opts.get('chunk', '?')} tokens "
        "per forward pass, answer greedy" + _rerun_note(opts, ok),
        "\n## Accuracy (all tasks; in brackets: cells whose hit/miss equals `full`'s)\n\n"
        + _table(["policy", "kind", *[f"budget {lab}" for lab in labels]], rows),
        "\n**Lossy policy that retrieves best, per budget:**\n\n" + (ranking or "- (no lossy runs)"),
        "\n" + exact_check(ok),
        "\n## By task\n\n" + _table(["policy", "budget", *opts.get("kinds", []), "mean seconds"], by_kind),
        "\n## By context length (accuracy over kinds and depths)\n\n"
        + _table(["policy", "budget", *[f"{n} tokens" for n in lengths]], by_length)
        + _problems(runs, ["policy", "budget", "kind", "length", "depth"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(parts) + "\n"


def exact_check(ok: list[dict[str, Any]]) -> str:
    """The issue's goal for exact policies: hit/miss equal to ``full``'s in every cell they ran
    (and, stricter, the same answer text); lists every cell that differs."""
    lines = ["## Exact policies vs `full` (goal: equal in every cell)", ""]
    exact = [p for p in _policy_order(ok) if p != REFERENCE and _exact(ok).get(p)]
    if not exact:
        return "\n".join(lines + ["- (no exact policy besides `full` ran)"])
    for policy in exact:
        rs = [r for r in ok if r["policy"] == policy and r.get("same_as_full") is not None]
        same = sum(bool(r["same_as_full"]) for r in rs)
        text = sum(bool(r.get("answer_matches_full")) for r in rs)
        cells = sorted({r["length"] for r in rs})
        lines.append(f"- `{policy}`: hit/miss equal to `full` in {same}/{len(rs)} cells, same answer text in "
                     f"{text}/{len(rs)} (lengths {', '.join(map(str, cells)) or '–'})"
                     + ("" if same == len(rs) else " -- **NOT EQUAL: a bug**"))
        for r in rs:
            if not r["same_as_full"] or not r.get("answer_matches_full"):
                lines.append(f"  - differs: {r['kind']} {r['length']} @ {r['depth']:g}, budget {r.get('budget')}: "
                             f"answer {r['answer']!r}")
    return "\n".join(lines)


def needle_plots(data: dict[str, Any], out: Path) -> list[str]:
    """One depth x length heatmap per policy and budget (accuracy over the task kinds)."""
    ok = _ok(data["runs"])
    if not ok:
        return []
    plt = _plt()
    labels = _labels(ok)
    lengths = sorted({r["length"] for r in ok})
    depths = sorted({r["depth"] for r in ok})
    panels = [(p, None) for p in _policy_order(ok) if any(r["policy"] == p and r.get("budget_label") is None for r in ok)]
    panels += [(p, lab) for p in _policy_order(ok) for lab in labels
               if any(r["policy"] == p and r.get("budget_label") == lab for r in ok)]
    cols = min(4, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols + 1.2, 2.3 * rows + 0.8), squeeze=False)
    image = None
    for ax, (policy, label) in zip(axes.flat, panels):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                hits = [r["found"] for r in ok if r["policy"] == policy and r.get("budget_label") == label
                        and r["depth"] == d and r["length"] == n]
                if hits:
                    grid[i][j] = 100.0 * mean(hits)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto", origin="upper")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:
                    ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{policy}" + (f" @ {label}" if label else ""), fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}%" for d in depths], fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.supxlabel("context length (tokens)")
    fig.supylabel("needle depth")
    fig.suptitle(f"Needle retrieval accuracy (%) -- {data['meta'].get('model', {}).get('name', '?')}", fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="accuracy %")
    fig.savefig(out / "needle_heatmap.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return ["needle_heatmap.png"]
