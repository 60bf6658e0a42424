"""Render ``results.json`` into ``report.md`` and PNG plots (matplotlib, Agg backend).

Everything here reads only the results file, so a finished or interrupted run can be re-rendered
with ``kvbound bench --report-only --out DIR``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import mean
from typing import Any, Iterable

from .results import load_results

REFERENCE = "full"
MiB = 2**20


# --------------------------------------------------------------------------- helpers


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _mib(x: float | None) -> str:
    return "–" if x is None else f"{x / MiB:.2f}"


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if r.get("status") == "ok"]


def _label_key(label: str | None) -> float:
    return float("inf") if label is None else float(label)


def _policy_order(runs: list[dict[str, Any]]) -> list[str]:
    names = sorted({r["policy"] for r in runs})
    return ([REFERENCE] if REFERENCE in names else []) + [n for n in names if n != REFERENCE]


def _model_line(model: dict[str, Any]) -> str:
    return (f"`{model.get('name', '?')}` ({model.get('model_type', '?')}, {model.get('layers', '?')} layers, "
            f"hidden {model.get('hidden_size', '?')}, {model.get('kv_heads', '?')} KV heads x {model.get('head_dim', '?')}, "
            f"{model.get('dtype', '?')})")


def _meta_section(data: dict[str, Any], models: list[dict[str, Any]] | None = None) -> str:
    """The run's machine, model(s), versions, command, dates and load. ``models`` replaces the
    meta's model (scenarios whose workers load the models themselves)."""
    meta = data["meta"]
    hw = meta.get("hardware", {})
    models = models or [meta.get("model", {})]
    vers = meta.get("versions", {})
    machine = f"{hw.get('cpu', '?')}, {hw.get('cpu_count', '?')} CPUs, torch threads {hw.get('torch_threads', '?')}"
    if hw.get("device", "cpu") != "cpu":
        machine += f", device {hw.get('device')} ({hw.get('cuda_device')})"
    if hw.get("memory_bytes"):
        machine += f", {hw['memory_bytes'] / 2**30:.0f} GiB RAM"
    lines = [
        f"- **Machine**: {machine}; {hw.get('platform', '?')}",
        f"- **Model{'s' if len(models) > 1 else ''}**: " + "; ".join(_model_line(m) for m in models),
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
        f"- **Command**: `{meta.get('command', '?')}`",
        f"- **Date**: {meta.get('date', '?')} (finished {meta.get('finished', 'not yet')})",
    ]
    load = [hw.get("load_average_start"), hw.get("load_average_end")]
    if any(load):
        lines.append(f"- **Load average** (1/5/15 min) at start {load[0]}, at end {load[1]} -- with {hw.get('cpu_count', '?')} "
                     "CPUs, a load above that count means other processes competed for the CPU and absolute "
                     "timings are inflated (ratios to `full` measured in the same run are less affected).")
    if meta.get("interrupted"):
        lines.append("- **Interrupted**: yes -- only the runs finished before Ctrl-C are included.")
    if meta.get("merged_from"):
        lines.append("- **Merged from** (`benchmarks/merge_bench_runs.py`; the Command/Date/Load lines above are the "
                     "first run's):")
        for src in meta["merged_from"]:
            src = src if isinstance(src, dict) else {"command": src}
            when = f" -- {src['date']} to {src.get('finished') or '?'}" if src.get("date") else ""
            load = (f", load {src.get('load_average_start')} -> {src.get('load_average_end')}"
                    if src.get("load_average_start") else "")
            lines.append(f"  - `{src.get('command', '?')}`{when}{load}")
    return "\n".join(lines)


def _problems(runs: list[dict[str, Any]], keys: list[str]) -> str:
    bad = [r for r in runs if r.get("status") != "ok"]
    if not bad:
        return ""
    rows = [[*(_fmt(r.get(k)) for k in keys), r.get("status", "?"), r.get("reason", "")] for r in bad]
    return "\n\n### Skipped / failed\n\n" + _table([*keys, "status", "reason"], rows)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


_MARKERS = "oDs^vP*Xh<>"


def _styles(policies: list[str], exact: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """Solid lines for exact policies, dashed for lossy; markers shrink in drawing order so lines that
    coincide (exact policies all at 100%) stay visible as nested markers."""
    out = {}
    for i, policy in enumerate(policies):
        ex = exact.get(policy, False)
        out[policy] = {"linestyle": "-" if ex else "--", "marker": _MARKERS[i % len(_MARKERS)],
                       "markersize": max(3.0, 12.0 - 1.0 * i), "linewidth": max(1.0, 3.2 - 0.25 * i),
                       "alpha": 0.9}
    return out


def _legend(ax) -> None:
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


# --------------------------------------------------------------------------- budget sweep


def sweep_summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over prompts per (policy, budget label), with per-prompt ratios to ``full``."""
    ok = _ok(runs)
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
    order = {p: i for i, p in enumerate(_policy_order(ok))}
    rows.sort(key=lambda r: (order[r["policy"]], _label_key(r["budget_label"])))
    return rows


def _sweep_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    rows = sweep_summary(runs)
    labels = sorted({r["budget_label"] for r in rows if r["budget_label"] is not None}, key=_label_key)
    fraction = any("." in lab for lab in labels)
    unit = "fraction of the prompt" if fraction else "tokens kept per layer"
    headline = []
    for policy in _policy_order(_ok(runs)):
        mine = {r["budget_label"]: r for r in rows if r["policy"] == policy}
        exact = next(iter(mine.values()))["exact"]
        cells = [mine[None]["token_match"] if None in mine else mine.get(lab, {}).get("token_match") for lab in labels]
        headline.append([f"`{policy}`", "exact" if exact else "lossy", *[_pct(c) for c in cells]])
    detail = [[f"`{r['policy']}`", r["budget_label"] or "–", r["prompts"], _pct(r["token_match"]),
               _pct(r["prefix_match"]), _fmt(r["mean_kl"], 4), _mib(r["peak_hot_kv_bytes"]), _x(r["hot_ratio"]),
               _mib(r["total_cache_bytes"]), _x(r["total_ratio"]), _mib(r["peak_transient_bytes"]),
               _mib(r["rss_added_bytes"]), _fmt(r["seconds_per_token"] and r["seconds_per_token"] * 1000, 1), _x(r["time_ratio_vs_full"]),
               r["needles"] or "–"] for r in rows]
    prompts = sorted({(r["prompt"], r.get("prompt_tokens")) for r in runs if r["policy"] == REFERENCE})
    n_new = next((r.get("new_tokens") for r in _ok(runs)), "?")
    parts = [
        f"# kvbound bench: budget sweep\n\n{_meta_section(data)}",
        "- **Prompts**: " + ", ".join(f"`{p}` ({t} tokens)" for p, t in prompts) + f"; {n_new} new tokens each, greedy",
        "\n## Token match with `full` (mean over prompts)\n\n"
        f"Budget = {unit}. Token match = fraction of the {n_new} greedy tokens equal to `full`'s at the same position.\n\n"
        + _table(["policy", "kind", *labels], headline),
        "\n## Details\n\nMeans over prompts. `KL` = mean KL(full ‖ policy) in nats of the next-token distributions, "
        "teacher-forced on full's continuation. Memory columns are measured on the tensors held: "
        "`peak hot KV` = K/V held for attention; `cache` = all tiers at the end (hot K/V + checkpoints/offloaded...); "
        "`× full` = ratio to `full` on the same prompt. `RSS added` = the process's peak RSS during the run above "
        "its RSS at the start (high-water mark reset between runs; allocator residue of earlier runs can hide "
        "part of a run's growth, `--scenario long` runs each policy in a fresh process). `ms/token` = decode step time after the prefill; "
        "`time × full` = ratio to `full`'s measured in the same run. `needle` = continuations containing the "
        "prompt's needle answer.\n\n"
        + _table(["policy", "budget", "prompts", "token match", "prefix match", "KL", "peak hot KV MiB", "× full",
                  "cache MiB", "× full", "transient MiB", "RSS added MiB", "ms/token", "time × full", "needle"], detail)
        + _problems(runs, ["policy", "budget", "prompt"]),
    ]
    parts.append("\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots))
    return "\n".join(parts) + "\n"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _x(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def _sweep_plots(data: dict[str, Any], out: Path) -> list[str]:
    plt = _plt()
    rows = sweep_summary(data["runs"])
    if not rows:
        return []
    model = data["meta"].get("model", {}).get("name", "?")
    labels = sorted({r["budget_label"] for r in rows if r["budget_label"] is not None}, key=_label_key)
    fraction = any("." in lab for lab in labels)
    xlabel = "budget (fraction of the prompt kept per layer)" if fraction else "budget (tokens kept per layer)"
    written = []
    for key, fname, ylabel, title in [
        ("token_match", "token_match.png", "token match with full (%)", "Agreement with the uncompressed cache"),
        ("time_ratio_vs_full", "time_ratio.png", "decode time per token ÷ full's", "Decode speed relative to full"),
        ("peak_hot_kv_bytes", "hot_kv.png", "peak hot K/V (MiB)", "K/V held for attention"),
    ]:
        fig, ax = plt.subplots(figsize=(9, 4.8))
        order = _policy_order(_ok(data["runs"]))
        styles = _styles(order, {r["policy"]: bool(r["exact"]) for r in rows})
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
        _legend(ax)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    return written


# --------------------------------------------------------------------------- multiturn


def _multiturn_md(data: dict[str, Any], plots: list[str]) -> str:
    runs, turns = data["runs"], data["turns"]
    ref_peak = next((r.get("peak_total_cache_bytes") for r in runs if r["policy"] == REFERENCE and r.get("status") == "ok"), None)
    last_rss = {}
    for t in turns:
        last_rss[t["policy"]] = t["rss_bytes"]
    rows = []
    for r in sorted(_ok(runs), key=lambda r: (r["policy"] != REFERENCE, r["policy"])):
        peak = r.get("peak_total_cache_bytes")
        rows.append([f"`{r['policy']}`", "exact" if r.get("exact") else "lossy", r.get("budget") or "–",
                     f"{r['replies_matching_full']}/{r['turns']}", r.get("first_divergent_turn") or "–",
                     _mib(r.get("peak_hot_kv_bytes")), _mib(peak), _x(peak / ref_peak if ref_peak and peak else None),
                     _mib(last_rss.get(r["policy"])), _fmt(r.get("seconds"), 1)])
    n_turns = max((t["turn"] for t in turns), default=0)
    text = [
        f"# kvbound bench: multi-turn chat\n\n{_meta_section(data)}",
        f"\n{n_turns} turns through the chat template. Every policy gets the same user messages; each policy's "
        "history holds its *own* earlier replies (so after a lossy policy's first wrong reply, later turns compare "
        "different conversations). One cache object per policy lives across all turns. `cache` = all tiers measured "
        "on the tensors held; RSS is the whole process (model weights and earlier policies' allocator residue "
        "included), so compare cache bytes, not RSS, between policies.\n",
        _table(["policy", "kind", "budget", "replies = full", "first different turn", "peak hot KV MiB",
                "peak cache MiB", "× full", "RSS at end MiB", "seconds"], rows),
        _problems(runs, ["policy", "budget"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(text) + "\n"


def _multiturn_plots(data: dict[str, Any], out: Path) -> list[str]:
    turns = data["turns"]
    if not turns:
        return []
    plt = _plt()
    exact = {r["policy"]: bool(r.get("exact")) for r in data["runs"]}
    model = data["meta"].get("model", {}).get("name", "?")
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharex=True)
    order = _policy_order(turns)
    styles = _styles(order, exact)
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
    _legend(axes[1])
    fig.tight_layout()
    fig.savefig(out / "cache_bytes.png", dpi=110)
    plt.close(fig)
    return ["cache_bytes.png"]


# --------------------------------------------------------------------------- bytes


def _bytes_md(data: dict[str, Any]) -> str:
    analytic = data["extra"].get("analytic_bytes_per_token", {})
    full = next((r for r in _ok(data["runs"]) if r["policy"] == REFERENCE), None)
    full_measured = full["bytes_by_tier"].get("hot_kv", 0) / max(1, full["tokens_seen"]) if full else None
    rows = [[k, f"{v:,}", _x(v / analytic["full_kv"]) if analytic.get("full_kv") else "–"] for k, v in analytic.items()]
    rows.append(["full K/V, measured (`full` policy)", "–" if full_measured is None else f"{full_measured:,.0f}",
                 _x(full_measured / analytic["full_kv"]) if full_measured and analytic.get("full_kv") else "–"])
    pol = []
    for r in _ok(data["runs"]):
        tiers = ", ".join(f"{k} {v:,.0f}" for k, v in r["bytes_per_token_by_tier"].items())
        pol.append([f"`{r['policy']}`", r.get("budget") or "–", r["tokens_seen"], f"{r['bytes_per_token']:,.0f}",
                    _x(r["bytes_per_token"] / full_measured if full_measured else None), tiers])
    text = [
        f"# kvbound bench: bytes per token\n\n{_meta_section(data)}",
        "\n## Analytic (from the model config, batch 1)\n\nfull_kv = 2 · layers · kv_heads · head_dim · itemsize; "
        "per_layer_residual = layers · hidden · itemsize; layer0_residual = hidden · itemsize.\n",
        _table(["what", "bytes / token", "× full K/V"], rows),
        "\n## Measured steady state per policy\n\nAll tiers held after the prompt and the new tokens, divided by "
        "the tokens seen (a bounded policy's bytes/token keeps falling as the context grows).\n",
        _table(["policy", "budget", "tokens seen", "bytes / token", "× full", "by tier (bytes / token)"], pol),
        _problems(data["runs"], ["policy", "budget"]),
    ]
    return "\n".join(text) + "\n"


# --------------------------------------------------------------------------- latency


def _latency_md(data: dict[str, Any], plots: list[str]) -> str:
    layer = data["extra"].get("latency_layer", "?")
    rows = [[r["tokens"], r["batch"], _mib(r["kv_bytes"]), _mib(r["residual_bytes"]),
             _fmt(r["read_seconds"] * 1000, 3), _fmt(r["recompute_seconds"] * 1000, 3), _x(r["recompute_over_read"])]
            for r in _ok(data["runs"])]
    text = [
        f"# kvbound bench: read vs recompute latency\n\n{_meta_section(data)}",
        f"\nOne layer (index {layer}). **read** = copying the layer's cached K and V tensors (every byte read once "
        "and written once); **recompute** = `LayerDriver.project_kv` from the layer's stored pre-norm residuals "
        "(RMSNorm, k/v projection, k_norm if any, RoPE). Median of `torch.utils.benchmark` blocks. "
        "`recompute ÷ read` < 1 means recomputing is faster than reading.\n",
        _table(["cached tokens", "batch", "K/V MiB", "residual MiB", "read ms", "recompute ms", "recompute ÷ read"], rows),
        _problems(data["runs"], ["tokens", "batch"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(text) + "\n"


def _latency_plots(data: dict[str, Any], out: Path) -> list[str]:
    ok = _ok(data["runs"])
    if not ok:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for b in sorted({r["batch"] for r in ok}):
        pts = sorted((r["tokens"], r["recompute_over_read"]) for r in ok if r["batch"] == b)
        ax.plot(*zip(*pts), marker="o", label=f"batch {b}")
    ax.axhline(1.0, color="black", linestyle=":", label="recompute = read")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens per sequence")
    ax.set_ylabel("recompute time ÷ read time")
    hw = data["meta"].get("hardware", {})
    where = hw.get("cuda_device") if hw.get("device", "cpu") != "cpu" else f"{hw.get('cpu', '?')} x{hw.get('torch_threads', '?')} threads"
    ax.set_title(f"One layer's K/V: recompute vs read -- {data['meta'].get('model', {}).get('name', '?')}\n{where}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    return ["latency.png"]


# --------------------------------------------------------------------------- entry point


def render(out_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and the scenario's plots next to ``results.json``; return their paths."""
    out = Path(out_dir).expanduser()
    data = load_results(out)
    scenario = data["scenario"]
    if scenario == "budget-sweep":
        plots = _sweep_plots(data, out)
        md = _sweep_md(data, plots)
    elif scenario == "multiturn":
        plots = _multiturn_plots(data, out)
        md = _multiturn_md(data, plots)
    elif scenario == "bytes":
        plots = []
        md = _bytes_md(data)
    elif scenario == "latency":
        plots = _latency_plots(data, out)
        md = _latency_md(data, plots)
    elif scenario == "long":
        from .long_report import long_md, long_plots

        plots = long_plots(data, out)
        md = long_md(data, plots)
    elif scenario == "ruler":
        from .ruler_report import ruler_md, ruler_plots

        plots = ruler_plots(data, out)
        md = ruler_md(data, plots)
    elif scenario in ("perplexity", "needle"):
        from . import quality_report

        plots = getattr(quality_report, f"{scenario}_plots")(data, out)
        md = getattr(quality_report, f"{scenario}_md")(data, plots)
    else:
        from ..errors import KVBoundError

        raise KVBoundError(f"{out / 'results.json'} has unknown scenario {scenario!r}")
    (out / "report.md").write_text(md, encoding="utf-8")
    return [out / "report.md", *(out / p for p in plots)]
