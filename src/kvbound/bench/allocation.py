"""``kvbound bench --scenario allocation``: budgets over layers and heads at equal bytes.

Each variant is a policy with options, written ``policy+allocation`` or ``policy+KEY=VALUE+...``
(``snapkv``, ``snapkv+ada``, ``snapkv+pyramid``, ``razor+fraction=0.15``). Every run is a fresh
process (:func:`kvbound.bench.long.spawn`: the haystack prompt with its needle, RSS of the process,
decode time per token, the bytes held, the tokens each KV head kept), at every ``--lengths`` x
``--budgets`` (a fraction in (0, 1] is that share of the prompt). ``--perplexity-tokens N`` also
measures the perplexity of each variant over the first N tokens of the built-in corpus (in this
process). Writes ``results.json``, ``report.md`` (ratios against the first variant of each
length and budget) and one heatmap per run (``heatmap-*.png``: layer x KV head, tokens kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import KVBoundError


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``snapkv+ada`` -> ``("snapkv", {"allocation": "ada"})``; ``razor+fraction=0.2`` -> options."""
    policy, *parts = text.strip().split("+")
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            options["allocation"] = part
            continue
        options[key] = {"true": True, "false": False}.get(value.lower(), value)
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                pass
    return policy, options


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

    from ..cache import make_cache
    from ..models import load
    from ..quality.corpus import book_text
    from ..quality.perplexity import perplexity

    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load(model_name)
    ids = tokenizer(book_text(), return_tensors="pt")["input_ids"][:, :tokens]
    out = []
    for budget in budgets:
        for variant in variants:
            policy, options = parse_variant(variant)
            start = time.perf_counter()
            cache = make_cache(model, policy, int(budget), **options)
            result = perplexity(model, ids, cache)
            out.append({"variant": variant, "budget": int(budget), "tokens": ids.shape[-1],
                        "perplexity": result.perplexity, "seconds": time.perf_counter() - start,
                        "hot_kv_bytes": cache.memory_report()["hot_kv_bytes"]})
            print(json.dumps(out[-1]), flush=True)
    return out


def run(args: argparse.Namespace, argv: list[str] | None) -> int:
    from .long import LongJob, spawn

    variants = [v for v in (args.policies or "snapkv,snapkv+ada").split(",") if v.strip()]
    for v in variants:
        parse_variant(v)
    lengths = [int(x) for x in (args.lengths or "7500").split(",")]
    budgets = [float(x) for x in (args.budgets or "512").split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(argv or ["kvbound", *sys.argv[1:]]), "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
            "loadavg_start": os.getloadavg(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "model": args.model, "variants": variants, "lengths": lengths, "budgets": budgets}
    runs: list[dict[str, Any]] = []
    path = out / "results.json"
    for tokens in lengths:
        for b in budgets:
            budget = int(b * tokens) if b <= 1 else int(b)
            for variant in variants:
                policy, options = parse_variant(variant)
                job = LongJob(args.model, policy, tokens, None if policy == "full" else budget,
                              args.max_new_tokens or 16, args.prefill_chunk, args.threads, options)
                load_before = os.getloadavg()[0]
                record = spawn(job, args.timeout)
                record.update(variant=variant, budget_arg=b, loadavg_before=load_before, loadavg_after=os.getloadavg()[0])
                record.pop("token_ids", None)
                runs.append(record)
                print(f"{variant} {tokens} {budget}: {record.get('status')} "
                      f"{record.get('seconds_per_token') or record.get('reason')}", flush=True)
                if record.get("kept_tokens") and policy != "full":
                    name = f"heatmap-{variant.replace('+', '_').replace('=', '-')}-{tokens}-{budget}.png"
                    heatmap(record["kept_tokens"], out / name, f"{variant}, {tokens} tokens, budget {budget}")
                    record["heatmap"] = name
                path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    if args.perplexity_tokens:
        meta["perplexity"] = _perplexity(args.model, [v for v in variants if not v.startswith("full")],
                                         [b for b in budgets if b > 1], args.perplexity_tokens, args.threads)
    meta["loadavg_end"] = os.getloadavg()
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    (out / "report.md").write_text(report(meta, runs))
    print(out / "report.md")
    return 1 if any(r.get("status") != "ok" for r in runs) else 0


def report(meta: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """Markdown: one row per run, ratios against the first variant at the same length and budget."""
    lines = [f"# Allocation bench: {meta['model']}", "", f"Command: `{meta['command']}`", "",
             f"Started {meta['started']}, load average at start {meta['loadavg_start'][0]:.1f}, "
             f"at end {meta.get('loadavg_end', [float('nan')])[0]:.1f} ({meta['cpus']} CPUs, shared).", "",
             "Decode CPU s/token is the process's CPU time per decoded token: on a shared box the wall time "
             "(s/token) mostly measures how much of a core the run got.", "",
             "| tokens | budget | variant | needle | hot K/V bytes | × first | RSS added | × first | decode s/token "
             "| decode CPU s/token | × first | prefill CPU s | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base: dict[tuple[int, Any], dict[str, Any]] = {}
    for r in runs:
        key = (r.get("tokens"), r.get("budget_arg"))
        if r.get("status") != "ok":
            lines.append(f"| {r.get('tokens')} | {r.get('budget')} | {r['variant']} | error: {r.get('reason')} |"
                         " | | | | | | | | |")
            continue
        ref = base.setdefault(key, r)

        def ratio(k):
            return f"{r[k] / ref[k]:.3f}" if ref.get(k) else "—"

        lines.append(f"| {r['tokens']} | {r.get('budget')} | {r['variant']} | {r.get('needle_found')} | "
                     f"{r['hot_kv_bytes']:,} | {ratio('hot_kv_bytes')} | {r['rss_added_bytes'] / 2**20:.1f} MiB | "
                     f"{ratio('rss_added_bytes')} | {r['seconds_per_token']:.3f} | {r['cpu_seconds_per_token']:.4f} | "
                     f"{ratio('cpu_seconds_per_token')} | {r['prefill_cpu_seconds']:.1f} | {r['loadavg_before']:.1f} |")
    if meta.get("perplexity"):
        lines += ["", "## Perplexity (built-in corpus)", "", "| budget | variant | tokens | perplexity | hot K/V bytes |",
                  "|---|---|---|---|---|"]
        for p in meta["perplexity"]:
            lines.append(f"| {p['budget']} | {p['variant']} | {p['tokens']} | {p['perplexity']:.3f} | "
                         f"{p['hot_kv_bytes']:,} |")
    lines += ["", "Heatmaps (layer × KV head, tokens kept): " + ", ".join(
        f"[{r['variant']} {r['tokens']}]({r['heatmap']})" for r in runs if r.get("heatmap"))]
    return "\n".join(lines) + "\n"


def check(args: argparse.Namespace) -> None:
    if args.lengths is None:
        return
    try:
        [int(x) for x in args.lengths.split(",")]
    except ValueError:
        raise KVBoundError(f"--lengths must be comma-separated token counts, got {args.lengths!r}") from None
