"""Shared pieces of the scenario renderers: number formats, Markdown tables, the provenance
section (command, commit, machine, load, date) and matplotlib styles. Imports nothing from the
scenario modules (they import it)."""

from __future__ import annotations

from collections import defaultdict
from statistics import mean
from typing import Any, Iterable

REFERENCE = "full"
MiB = 2**20

# --------------------------------------------------------------------------- helpers


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MiB:.2f}"


def table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ok_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("status") == "ok"]


def label_key(label: str | None) -> float:
    return float("inf") if label is None else float(label)


def policy_order(runs: list[dict[str, Any]]) -> list[str]:
    names = sorted({r["policy"] for r in runs})
    return ([REFERENCE] if REFERENCE in names else []) + [n for n in names if n != REFERENCE]


def model_line(model: dict[str, Any]) -> str:
    if "model_type" not in model:  # a scenario that loads no model, or its workers describe it
        return f"`{model.get('name', '?')}`"
    return (f"`{model.get('name', '?')}` ({model.get('model_type', '?')}, {model.get('layers', '?')} layers, "
            f"hidden {model.get('hidden_size', '?')}, {model.get('kv_heads', '?')} KV heads x {model.get('head_dim', '?')}, "
            f"{model.get('dtype', '?')})")


def meta_section(data: dict[str, Any], models: list[dict[str, Any]] | None = None) -> str:
    """The run's machine, model(s), versions, command, dates and load. ``models`` replaces the
    meta's model (scenarios whose workers load the models themselves)."""
    meta = data["meta"]
    hw = meta.get("hardware", {})
    models = models or [meta.get("model", {})]
    vers = meta.get("versions", {})
    machine = (f"`{hw['machine']}`: " if hw.get("machine") else "") + f"{hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} CPUs, torch threads {hw.get('torch_threads', '?')}"
    if hw.get("device", "cpu") != "cpu":
        machine += f", device {hw.get('device')} ({hw.get('cuda_device')})"
    if hw.get("memory_bytes"):
        machine += f", {hw['memory_bytes'] / 2**30:.0f} GiB RAM"
    if not hw.get("cpu") and not hw.get("machine"):
        machine = "not recorded"
    lines = [
        f"- **Machine**: {machine}" + (f"; {hw['platform']}" if hw.get("platform") else ""),
        f"- **Model{'s' if len(models) > 1 else ''}**: " + "; ".join(model_line(m) for m in models),
        "- **Versions**: " + (", ".join(f"{k} {v}" for k, v in vers.items()) or "not recorded"),
        f"- **Command**: `{meta.get('command', '?')}`",
        f"- **Commit**: {('`' + meta['commit'] + '`') if meta.get('commit') else 'not recorded'}",
        f"- **Date**: {meta.get('date', '?')} (finished {meta.get('finished', 'not yet')})",
    ]
    load = [hw.get("load_average_start"), hw.get("load_average_end")]
    if any(load):
        lines.append(f"- **Load average** (1/5/15 min) at start {load[0]}, at end {load[1]} -- with {hw.get('cpu_count', '?')} "
                     "CPUs, a load above that count means other processes competed for the CPU and absolute "
                     "timings are inflated (ratios to `full` measured in the same run are less affected).")
    if meta.get("note"):
        lines.append(f"- **Note**: {meta['note']}")
    if meta.get("interrupted"):
        lines.append("- **Interrupted**: yes -- only the runs finished before Ctrl-C are included.")
    if meta.get("merged_from"):
        lines.append("- **Merged from** (`kvbound bench merge`; the Command/Date/Load lines above are the "
                     "first run's):")
        for src in meta["merged_from"]:
            src = src if isinstance(src, dict) else {"command": src}
            when = f" -- {src['date']} to {src.get('finished') or '?'}" if src.get("date") else ""
            load = (f", load {src.get('load_average_start')} -> {src.get('load_average_end')}"
                    if src.get("load_average_start") else "")
            lines.append(f"  - `{src.get('command', '?')}`{when}{load}")
    return "\n".join(lines)


def problems(runs: list[dict[str, Any]], keys: list[str]) -> str:
    bad = [r for r in runs if r.get("status") != "ok"]
    if not bad:
        return ""
    rows = [[*(fmt(r.get(k)) for k in keys), r.get("status", "?"), r.get("reason", "")] for r in bad]
    return "\n\n### Skipped / failed\n\n" + table([*keys, "status", "reason"], rows)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


MARKERS = "oDs^vP*Xh<>"


def line_styles(policies: list[str], exact: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Solid lines for exact policies, dashed for lossy; markers shrink in drawing order so lines that
    coincide (exact policies all at 100%) stay visible as nested markers."""
    out = {}
    for i, policy in enumerate(policies):
        ex = exact.get(policy, False)
        out[policy] = {"linestyle": "-" if ex else "--", "marker": MARKERS[i % len(MARKERS)],
                       "markersize": max(3.0, 12.0 - 1.0 * i), "linewidth": max(1.0, 3.2 - 0.25 * i),
                       "alpha": 0.9}
    return out


def legend(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def times(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"




def best_lossy(runs: list[dict[str, Any]], key: str, higher_is_better: bool) -> dict[str, tuple[str, float]]:
    """Per budget label: the lossy policy (or policies tied, joined by " = ") with the best mean
    ``key``, and that value."""
    groups: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ok_runs(runs):
        if not r.get("exact") and r.get("budget_label") is not None and r.get(key) is not None:
            groups[r["budget_label"]][r["policy"]].append(float(r[key]))
    best: dict[str, tuple[str, float]] = {}
    for label, by_policy in groups.items():
        means = {p: mean(v) for p, v in by_policy.items()}
        top = (max if higher_is_better else min)(means.values())
        tied = sorted(p for p, v in means.items() if abs(v - top) <= 1e-9)
        best[label] = ("` = `".join(tied), top)
    return best
