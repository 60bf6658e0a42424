"""``needle``: RULER-style needle-in-a-haystack retrieval accuracy per policy and budget, over
context length x needle depth (:mod:`kvbound.quality.needle`), ``full`` the reference in the same run.

Options: ``--lengths`` (default 1024,2048), ``--depths`` (default 0,0.5,1), ``--kinds`` (default
single,multikey), ``--chunk`` (prefill chunk, default 256), ``--budgets`` (default 256),
``--rerun-max-length`` (default 1024: ``kv-direct``, which re-runs the model over the evicted span
every step, runs only at lengths up to it; 0 = every length).
"""

from __future__ import annotations

import time
from pathlib import Path
from statistics import mean
from typing import Any

from ...cache.registry import rerunning_policies
from ...errors import KVBoundError
from ...quality import needle as niah
from ..inputs import Budget
from ..render import (
    REFERENCE,
    best_lossy,
    fmt,
    label_key,
    meta_section,
    ok_runs,
    pct,
    policy_order,
    problems,
    pyplot,
    table,
)
from ..runner import (
    Bench,
    Context,
    _cache_for,
    _close,
    _failure,
    _memory,
    _seed,
    chunk_option,
    positive_ints,
    quality_jobs,
    spec,
)

DEFAULT_BUDGETS = "256"
DEFAULT_LENGTHS = "1024,2048"
DEFAULT_DEPTHS = "0,0.5,1"
DEFAULT_KINDS = "single,multikey"
DEFAULT_CHUNK = 256
DEFAULT_RERUN_MAX_LENGTH = 1024  # kv-direct CPU time per cell: 6.7x full at 1024, 9.5x at 2048
# (benchmarks/results/needle-long; measured before kv-direct took prompts by id, which cut its prefill)

SUMMARY = "needle-in-a-haystack accuracy over context length x depth"


def add_arguments(group) -> None:
    group.add_argument("--depths", default=DEFAULT_DEPTHS,
                       help=f"needle: depths of the needle, fractions in [0,1] (default: {DEFAULT_DEPTHS})")
    group.add_argument("--kinds", default=DEFAULT_KINDS,
                       help=f"needle: tasks, from {', '.join(niah.KINDS)} (default: {DEFAULT_KINDS})")
    group.add_argument("--rerun-max-length", type=int, default=DEFAULT_RERUN_MAX_LENGTH, metavar="N",
                       help="needle: run the policies that re-run the model over the whole evicted span every step "
                            f"({', '.join(rerunning_policies()) or 'none'}; their time grows with the context) only at "
                            f"lengths up to N; the report says which cells were skipped (default: "
                            f"{DEFAULT_RERUN_MAX_LENGTH}; 0 = every length)")


def _depths(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVBoundError(f"--depths must be comma-separated fractions in [0,1], got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise KVBoundError(f"--depths must be comma-separated fractions in [0,1], got {text!r}")
    return values


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in niah.KINDS]
    if not kinds or bad:
        raise KVBoundError(f"--kinds must be from {', '.join(niah.KINDS)}, got {text!r}")
    return kinds


def options(args) -> dict[str, Any]:
    if args.rerun_max_length < 0:
        raise KVBoundError(f"--rerun-max-length must be >= 0 tokens (0 = every length), got {args.rerun_max_length}")
    return {"lengths": positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths"), "depths": _depths(args.depths),
            "kinds": _kinds(args.kinds), "chunk": chunk_option(args, DEFAULT_CHUNK),
            "rerun_max_length": args.rerun_max_length}


def run(ctx: Context) -> None:
    needle_grid(ctx.bench, ctx.budgets, ctx.options)


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = needle_plots(data, out)
    return needle_md(data, plots), plots


def needle_grid(bench: Bench, budgets: list[Budget], opts: dict[str, Any]) -> None:
    """For every task (kind x length x depth): ``full`` first, then every policy x budget, each
    answering greedily through its own fresh cache; ``same_as_full`` compares hit/miss with full's."""
    from ...generation import max_positions

    limit = max_positions(bench.model)
    too_long = [n for n in opts["lengths"] if limit is not None and n > limit]
    if too_long:
        raise KVBoundError(f"needle length {too_long[0]} is beyond the model's {limit} positions; "
                           f"use --lengths up to {limit}")
    tasks = [niah.make_task(bench.tokenizer, length, depth, kind, seed=bench.seed)
             for kind in opts["kinds"] for length in opts["lengths"] for depth in opts["depths"]]
    jobs = quality_jobs(bench.policies if REFERENCE in bench.policies else [REFERENCE, *bench.policies], budgets)
    cap, slow = opts.get("rerun_max_length", 0), set(rerunning_policies())
    cells = [(task, [(p, b) for p, b in jobs if not (cap and p in slow and task.length > cap)]) for task in tasks]
    bar = bench.bar(sum(len(j) for _, j in cells), "needle")
    try:
        for task, task_jobs in cells:
            full = {}
            for policy, budget in task_jobs:
                tokens = budget.tokens(task.tokens) if budget is not None else None
                bar.set_postfix_str(f"{task.kind} {task.length}@{task.depth:g}: {policy} @ {tokens}")
                record = _needle_one(bench, policy, tokens, budget, task, opts["chunk"])
                if policy == REFERENCE and record["status"] == "ok":
                    full = record
                if record["status"] == "ok" and full:
                    record["same_as_full"] = record["found"] == full["found"]
                    record["answer_matches_full"] = record["answer"] == full["answer"]
                bench.save_run(record)
                bar.update()
    finally:
        bar.close()


def _needle_one(bench: Bench, policy: str, tokens: int | None, budget: Budget | None, task: niah.NeedleTask,
                chunk: int) -> dict[str, Any]:
    record: dict[str, Any] = {"policy": policy, "exact": spec(policy).exact, "budget": tokens,
                              "budget_label": budget.label if budget is not None else None, "kind": task.kind,
                              "length": task.length, "prompt_tokens": task.tokens, "depth": task.depth,
                              "value": task.value, "status": "ok"}
    cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, tokens)
        cpu = time.process_time()
        got = niah.run_task(bench.model, bench.tokenizer, task, cache, prefill_chunk=chunk,
                            max_new_tokens=bench.max_new_tokens or None)
        record.update(found=got.found, answer=got.answer, seconds=got.seconds, cpu_seconds=time.process_time() - cpu,
                      peak_hot_kv_bytes=cache.peak_hot_kv_bytes, total_cache_bytes=_memory(cache)["total_cache_bytes"])
    except Exception as exc:
        record["status"], record["reason"] = _failure(exc)
    finally:
        _close(cache)
    return record


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({r["budget_label"] for r in runs if r.get("budget_label") is not None}, key=label_key)


def _exact(runs: list[dict[str, Any]]) -> dict[str, bool]:
    return {r["policy"]: bool(r.get("exact")) for r in runs}


# --------------------------------------------------------------------------- perplexity




def _rerun_note(opts: dict[str, Any], ok: list[dict[str, Any]]) -> str:
    """Which (policy, length) cells ``--rerun-max-length`` left out, if any."""
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
    for policy in policy_order(ok):
        for label in ([None] if any(r["policy"] == policy and r.get("budget_label") is None for r in ok) else labels):
            rs = [r for r in ok if r["policy"] == policy and r.get("budget_label") == label]
            if rs:
                yield ([f"`{policy}`", label or "–",
                        *[pct(mean(r["found"] for r in rs if r[key] == v)) if any(r[key] == v for r in rs) else "–"
                          for v in values]], rs)


def needle_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    ok = ok_runs(runs)
    labels = _labels(ok)
    opts = data["meta"].get("options", {})
    rows = []
    for policy in policy_order(ok):
        mine = [r for r in ok if r["policy"] == policy]
        kind = "exact" if mine[0].get("exact") else "lossy"
        cells = []
        for label in labels:
            rs = [r for r in mine if r.get("budget_label") in (label, None)]
            if not rs:
                cells.append("–")
                continue
            same = [r["same_as_full"] for r in rs if r.get("same_as_full") is not None]
            cells.append(f"{pct(mean(r['found'] for r in rs))} ({sum(same)}/{len(same)} = full)")
        rows.append([f"`{policy}`", kind, *cells])
    by_kind = [row + [fmt(mean(r["seconds"] for r in rs), 1)]
               for row, rs in _accuracy_rows(ok, labels, "kind", opts.get("kinds", []))]
    best = best_lossy(runs, "found", higher_is_better=True)
    ranking = "\n".join(f"- budget {label}: `{p}` ({pct(v)})" for label, (p, v) in sorted(best.items(), key=lambda kv: label_key(kv[0])))
    lengths = sorted({r["length"] for r in ok})
    by_length = [row for row, _ in _accuracy_rows(ok, labels, "length", lengths)]
    parts = [
        f"# kvbound bench: needle retrieval\n\n{meta_section(data)}",
        f"- **Tasks**: {', '.join(opts.get('kinds', []))} (RULER-style, built in code); lengths "
        f"{opts.get('lengths')} tokens; depths {opts.get('depths')}; prompt prefilled {opts.get('chunk', '?')} tokens "
        "per forward pass, answer greedy" + _rerun_note(opts, ok),
        "\n## Accuracy (all tasks; in brackets: cells whose hit/miss equals `full`'s)\n\n"
        + table(["policy", "kind", *[f"budget {lab}" for lab in labels]], rows),
        "\n**Lossy policy that retrieves best, per budget:**\n\n" + (ranking or "- (no lossy runs)"),
        "\n" + exact_check(ok),
        "\n## By task\n\n" + table(["policy", "budget", *opts.get("kinds", []), "mean seconds"], by_kind),
        "\n## By context length (accuracy over kinds and depths)\n\n"
        + table(["policy", "budget", *[f"{n} tokens" for n in lengths]], by_length)
        + problems(runs, ["policy", "budget", "kind", "length", "depth"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(parts) + "\n"


def exact_check(ok: list[dict[str, Any]]) -> str:
    """The issue's goal for exact policies: hit/miss equal to ``full``'s in every cell they ran
    (and, stricter, the same answer text); lists every cell that differs."""
    lines = ["## Exact policies vs `full` (goal: equal in every cell)", ""]
    exact = [p for p in policy_order(ok) if p != REFERENCE and _exact(ok).get(p)]
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
    ok = ok_runs(data["runs"])
    if not ok:
        return []
    plt = pyplot()
    labels = _labels(ok)
    lengths = sorted({r["length"] for r in ok})
    depths = sorted({r["depth"] for r in ok})
    panels = [(p, None) for p in policy_order(ok) if any(r["policy"] == p and r.get("budget_label") is None for r in ok)]
    panels += [(p, lab) for p in policy_order(ok) for lab in labels
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
