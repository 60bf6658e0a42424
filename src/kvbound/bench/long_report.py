"""``report.md`` and plots of ``kvbound bench --scenario long`` (see :mod:`kvbound.bench.long`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .report import MiB, REFERENCE, _fmt, _legend, _meta_section, _mib, _ok, _pct, _plt, _policy_order, _styles, _table, _x

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
    for r in _ok(runs):
        rows.append([r["model"], r["tokens"], f"`{run_label(r)}`", _fmt(r.get("budget")), _chunk(r),
                     _pct(r.get("token_match")) if r.get("token_match") is not None else "ref",
                     f"{r['peak_rss_bytes'] / MiB:.0f}", f"{r['rss_added_bytes'] / MiB:.0f}",
                     _x(r.get("rss_added_ratio_vs_full")), _mib(r["peak_hot_kv_bytes"]), _mib(r["total_cache_bytes"]),
                     f"{r['prefill_seconds']:.1f}", f"{1000 * r['seconds_per_token']:.0f}",
                     _x(r.get("decode_ratio_vs_full"))])
    return rows


HEADER = ["model", "prompt tokens", "policy", "budget", "prefill chunk", "token match vs full", "peak RSS (MiB)",
          "RSS added above loaded model (MiB)", "added ÷ full's", "peak hot K/V (MiB)", "cache total (MiB)",
          "time to first token (s)", "decode ms/token", "decode ÷ full's"]


def _models(runs: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The models as the workers described them (first finished run of each)."""
    seen: dict[str, dict[str, Any]] = {}
    for r in _ok(runs):
        if r.get("model_info") and r["model"] not in seen:
            seen[r["model"]] = r["model_info"]
    return list(seen.values()) or None


def long_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    parts = [
        "# kvbound bench -- long context", "", _meta_section(data, _models(runs)), "",
        "Each run is a fresh process: it loads the model, lowers the RSS high-water mark to the loaded "
        "model's resident size, then prefills the prompt and decodes. *RSS added* = peak RSS minus that "
        "loaded size; *time to first token* includes every prefill chunk; decode ms/token is the mean "
        "after the first token. Ratios and token match are against `full` at the same length with the "
        "same prefill chunk (its one-shot row is compared with that chunked `full`). Timings on a shared "
        "CPU are noisy; ratios in one run are the comparable numbers.", "",
        _table(HEADER, table_rows(runs)),
    ]
    one_shot = [r for r in _ok(runs) if r["policy"] == REFERENCE and r.get("chunk") is None
                and r.get("chunked_over_one_shot_prefill") is not None]
    if one_shot:
        parts += ["", "## Chunked vs one-shot prefill (`full`)", "",
                  _table(["model", "prompt tokens", "one-shot prefill (s)", "chunked ÷ one-shot", "RSS added one-shot (MiB)",
                          "tokens equal"],
                         [[r["model"], r["tokens"], f"{r['prefill_seconds']:.1f}", _x(r["chunked_over_one_shot_prefill"]),
                           f"{r['rss_added_bytes'] / MiB:.0f}", _pct(r.get("token_match"))] for r in one_shot])]
    spec = [r for r in _ok(runs) if r.get("speculation")]
    if spec:
        parts += ["", "## Exact self-speculative decoding", "",
                  _table(["model", "prompt tokens", "policy", "drafts accepted / verification", "decode ÷ full's"],
                         [[r["model"], r["tokens"], f"`{run_label(r)}`", f"{r['speculation']['mean_accepted']:.2f}",
                           _x(r.get("decode_ratio_vs_full"))] for r in spec])]
    bad = [r for r in runs if r.get("status") != "ok"]
    if bad:
        parts += ["", "## Skipped / failed", "",
                  _table([*KEYS, "status", "reason"],
                         [[*(_fmt(r.get(k)) for k in KEYS), r.get("status", "?"), r.get("reason", "")] for r in bad])]
    parts += [""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def long_plots(data: dict[str, Any], out: Path) -> list[str]:
    plt = _plt()
    runs = [r for r in _ok(data["runs"]) if r.get("chunk") is not None or r["policy"] != REFERENCE]
    written = []
    for model in sorted({r["model"] for r in runs}):
        mine = [r for r in runs if r["model"] == model]
        labels = _policy_order([{"policy": run_label(r)} for r in mine])
        styles = _styles(labels, {run_label(r): bool(r.get("exact")) for r in mine})
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
            _legend(ax)
            fig.tight_layout()
            fname = f"long_{name}_{model}.png"
            fig.savefig(out / fname, dpi=110)
            plt.close(fig)
            written.append(fname)
    return written
