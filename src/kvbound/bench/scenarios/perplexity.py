"""``perplexity``: perplexity vs budget per policy on one long text (teacher-forced through each
policy's cache with :func:`kvbound.quality.perplexity`), ``full`` the reference in the same run.

Options: ``--text-file`` (default: the KJV book of Acts, :mod:`kvbound.quality.corpus`), ``--max-tokens``
(default 1024), ``--chunk`` (tokens per pass, default 16; 1 = every prediction a decoding step),
``--budgets`` (default 32,64,128). Policy variants (``--policies full,kivi:bits=4``) compare
quantizers the same way (the quantization table).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ...errors import KVBoundError
from ...quality import perplexity
from ..inputs import Budget
from ..render import (
    REFERENCE,
    best_lossy,
    fmt,
    label_key,
    legend,
    line_styles,
    meta_section,
    ok_runs,
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
    quality_jobs,
    spec,
)

DEFAULT_BUDGETS = "32,64,128"
DEFAULT_PPL_TOKENS = 1024
DEFAULT_CHUNK = 16

SUMMARY = "perplexity vs budget on a long text"


def add_arguments(group) -> None:
    group.add_argument("--text-file", default=None, metavar="PATH",
                       help="perplexity: text to score (default: the bundled KJV book of Acts)")
    group.add_argument("--max-tokens", type=int, default=None, metavar="N",
                       help=f"perplexity: score the first N tokens (default: {DEFAULT_PPL_TOKENS})")


def options(args) -> dict[str, Any]:
    tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_PPL_TOKENS
    if tokens < 2:
        raise KVBoundError(f"--max-tokens must be >= 2, got {tokens}")
    return {"text": args.text_file or f"kjv:{_corpus().DEFAULT_BOOK}", "max_tokens": tokens,
            "chunk": chunk_option(args, DEFAULT_CHUNK)}


def _corpus():
    from ...quality import corpus

    return corpus


def run(ctx: Context) -> None:
    perplexity_vs_budget(ctx.bench, ctx.budgets, ctx.options)


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = perplexity_plots(data, out)
    return perplexity_md(data, plots), plots


def perplexity_ids(bench: Bench, opts: dict[str, Any]):
    from ...prompts import read_prompt_file

    name = opts["text"]
    text = _corpus().book_text(name.split(":", 1)[1]) if name.startswith("kjv:") else read_prompt_file(name, "text file")
    ids = bench.tokenizer(text, return_tensors="pt")["input_ids"][:, :opts["max_tokens"]]
    if ids.shape[1] < 2:
        raise KVBoundError(f"the text {name} is {ids.shape[1]} token(s); perplexity needs at least 2")
    return ids.to(bench.device)


def perplexity_vs_budget(bench: Bench, budgets: list[Budget], opts: dict[str, Any]) -> None:
    """Every policy x budget scores the same text with :func:`kvbound.quality.perplexity`;
    ``full`` (once, first) is the reference for ``ppl_ratio_vs_full`` and ``time_ratio_vs_full``."""
    ids = perplexity_ids(bench, opts)
    bench.results.set_extra("text_tokens", int(ids.shape[1]))
    jobs = quality_jobs(bench.policies if REFERENCE in bench.policies else [REFERENCE, *bench.policies], budgets)
    ref: dict[str, Any] = {}
    bar = bench.bar(len(jobs), "perplexity")
    try:
        for policy, budget in jobs:
            tokens = budget.tokens(ids.shape[1]) if budget is not None else None
            bar.set_postfix_str(f"{policy} @ {tokens}")
            record = _perplexity_one(bench, policy, tokens, budget, ids, opts["chunk"], ref)
            if policy == REFERENCE and record["status"] == "ok":
                ref = record
            bench.save_run(record)
            bar.update()
    finally:
        bar.close()


def _perplexity_one(bench: Bench, policy: str, tokens: int | None, budget: Budget | None, ids, chunk: int,
                    ref: dict[str, Any]) -> dict[str, Any]:
    record: dict[str, Any] = {"policy": policy, "exact": spec(policy).exact, "budget": tokens,
                              "budget_label": budget.label if budget is not None else None, "status": "ok"}
    cache = None
    try:
        _seed(bench.seed)
        cache = _cache_for(bench.model, policy, tokens)
        cpu = time.process_time()
        got = perplexity(bench.model, ids, cache, chunk=chunk)
        record.update(got.as_dict(), cpu_seconds=time.process_time() - cpu)
        record.update(_memory(cache))
        if ref:
            record["ppl_ratio_vs_full"] = got.perplexity / ref["perplexity"]
            record["time_ratio_vs_full"] = got.seconds / ref["seconds"]
    except Exception as exc:  # a policy that cannot run at this budget must not stop the bench
        record["status"], record["reason"] = _failure(exc)
    finally:
        _close(cache)
    return record


def _labels(runs: list[dict[str, Any]]) -> list[str]:
    return sorted({r["budget_label"] for r in runs if r.get("budget_label") is not None}, key=label_key)


def _exact(runs: list[dict[str, Any]]) -> dict[str, bool]:
    return {r["policy"]: bool(r.get("exact")) for r in runs}


# --------------------------------------------------------------------------- perplexity


def perplexity_md(data: dict[str, Any], plots: list[str]) -> str:
    runs = data["runs"]
    ok = ok_runs(runs)
    labels = _labels(ok)
    opts = data["meta"].get("options", {})
    ref = next((r for r in ok if r["policy"] == REFERENCE), None)
    rows = []
    for policy in policy_order(ok):
        mine = {r.get("budget_label"): r for r in ok if r["policy"] == policy}
        kind = "exact" if next(iter(mine.values())).get("exact") else "lossy"
        cells = []
        for label in labels:
            r = mine.get(label, mine.get(None))
            cells.append("–" if r is None else f"{r['perplexity']:.2f}" + (
                f" ({100 * (r['ppl_ratio_vs_full'] - 1):+.2f}%)" if r.get("ppl_ratio_vs_full") and policy != REFERENCE else ""))
        rows.append([f"`{policy}`", kind, *cells])
    detail = [[f"`{r['policy']}`", r.get("budget") or "–", f"{r['perplexity']:.4f}", fmt(r["mean_nll"], 5),
               fmt(r.get("ppl_ratio_vs_full"), 5), fmt(r["seconds"], 1), fmt(r.get("time_ratio_vs_full"), 2),
               f"{r['peak_hot_kv_bytes'] / 2**20:.2f}", f"{r['peak_rss_bytes'] / 2**20:.0f}"] for r in ok]
    best = best_lossy(runs, "perplexity", higher_is_better=False)
    ranking = "\n".join(f"- budget {label}: `{p}` ({v:.2f})" for label, (p, v) in sorted(best.items(), key=lambda kv: label_key(kv[0])))
    tokens = data["extra"].get("text_tokens", ref["tokens"] + 1 if ref else "?")
    parts = [
        f"# kvbound bench: perplexity vs budget\n\n{meta_section(data)}",
        f"- **Text**: `{opts.get('text', '?')}`, first {tokens} tokens ({tokens - 1 if isinstance(tokens, int) else '?'} "
        f"scored); chunk {opts.get('chunk', '?')} tokens per forward pass",
        "\n## Perplexity (lower is better; change vs `full` in brackets)\n\n"
        f"Budget = tokens kept per layer. Chunk {opts.get('chunk', '?')}: a lossy policy at budget B predicts each token "
        f"from B..B+{opts.get('chunk', 1) - 1 if isinstance(opts.get('chunk'), int) else '?'} past tokens (chunk 1 = "
        "strict token-by-token); exact policies do not depend on the chunk.\n\n"
        + table(["policy", "kind", *labels], rows),
        "\n**Lossy policy that loses least, per budget:**\n\n" + (ranking or "- (no lossy runs)"),
        "\n## Details\n\n`ppl ÷ full` = perplexity ratio to `full`; `time × full` = wall time ratio to `full`'s in the "
        "same run; `peak RSS` = the process high-water mark during the run (model weights included).\n\n"
        + table(["policy", "budget", "perplexity", "mean NLL", "ppl ÷ full", "seconds", "time × full",
                  "peak hot KV MiB", "peak RSS MiB"], detail)
        + problems(runs, ["policy", "budget"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(parts) + "\n"


def perplexity_plots(data: dict[str, Any], out: Path) -> list[str]:
    ok = ok_runs(data["runs"])
    labels = _labels(ok)
    if not ok or not labels:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8))
    order = policy_order(ok)
    styles = line_styles(order, _exact(ok))
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
    legend(ax)
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=110)
    plt.close(fig)
    return ["perplexity.png"]


# --------------------------------------------------------------------------- needle
