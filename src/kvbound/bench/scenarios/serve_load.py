"""``serve-load``: continuous batching in ``kvbound serve`` (:mod:`kvbound.batching`) under load.

``--mode load`` (default): for each ``--model`` (comma-separated) and ``--policies`` entry a fresh
server process (the ``serve-parking`` child, :func:`~kvbound.bench.scenarios.serve_parking.start_server`)
with ``--max-batch`` and the first ``--row-groups`` value; ``--client-levels`` concurrent clients
(default 1,4,8,16) each stream ``--requests`` greedy ``/v1/chat/completions`` of ``--max-new-tokens``
through the ``openai`` client. One record per level: aggregate tokens/s (completion tokens / wall
time of the level, TTFT included), time to first token, inter-token latency (client side, gaps
between streamed chunks) and per-token time p50/p95, the server's rows per decode pass, load average.
A policy whose server decodes one row per pass (``sequential``) runs only the levels up to
``--sequential-max-clients``. Every further ``--row-groups`` value gets one more server at 1 client
(the unpadded baseline with ``1``). ``--rounds N`` runs the levels N times on the same server, round
after round (each round's ratios are taken against its own 1-client level, measured minutes apart
at most); the report adds the medians over rounds, since one run's p95 moves by about ±0.3× between
identical runs on a 2-core box.

``--mode determinism``: ``--replies`` distinct greedy requests sent one at a time, then by 8
concurrent clients, to one fresh server per ``--row-groups`` value (one model, one policy); counts
the replies that differ. Needs the ``serve`` extra (uvicorn, openai). Loads no model in the bench process.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ...errors import KVBoundError
from ..render import meta_section, pyplot
from ..runner import Context
from .serve_parking import QUESTIONS, TOPICS, start_server, stats

NEEDS_MODEL = False
DEFAULT_NEW_TOKENS = 32
DEFAULT_BUDGETS = "32"
MODES = ("load", "determinism")
DETERMINISM_CLIENTS = 8

SUMMARY = "kvbound serve with continuous batching: tokens/s, TTFT, ITL per client count; greedy determinism"


def add_arguments(group) -> None:
    group.add_argument("--mode", choices=MODES, default="load",
                       help="serve-load: throughput and latency per client count, or greedy replies alone vs "
                            f"{DETERMINISM_CLIENTS} concurrent clients (default: load)")
    group.add_argument("--client-levels", default="1,4,8,16", metavar="N,N,...",
                       help="serve-load: concurrent clients per level (default: 1,4,8,16)")
    group.add_argument("--requests", type=int, default=1,
                       help="serve-load: requests per client per level (default: 1)")
    group.add_argument("--max-batch", type=int, default=8,
                       help="serve-load: the server's --max-batch (default: 8)")
    group.add_argument("--row-groups", default="4,1", metavar="G,G,...",
                       help="serve-load: the server's --row-group; load: the first at every level, the others at "
                            "1 client; determinism: one server each (default: 4,1)")
    group.add_argument("--interleave-chunk", type=int, default=None, metavar="N",
                       help="serve-load: the server's --interleave-chunk (default: the server's, "
                            "16; 0 = whole prefill chunks while others decode)")
    group.add_argument("--replies", type=int, default=104,
                       help="serve-load: distinct requests in --mode determinism (default: 104)")
    group.add_argument("--sequential-max-clients", type=int, default=4,
                       help="serve-load: most clients for a server that decodes one row per pass (default: 4)")


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise KVBoundError(f"serve-load: {name} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise KVBoundError(f"serve-load: {name} needs numbers >= 1, got {text!r}")
    return values


def options(args) -> dict[str, Any]:
    from ..runner import spec

    models = [m for m in args.model.split(",") if m]
    policies = args.policy_list if args.policies else ["full"]
    if len(args.budget_list) != 1 or args.budget_list[0].is_fraction:
        raise KVBoundError("serve-load takes one budget in tokens (--budgets 32)")
    if args.mode == "determinism" and (len(models) != 1 or len(policies) != 1):
        raise KVBoundError("serve-load --mode determinism runs one model and one policy")
    for value, name in ((args.requests, "--requests"), (args.max_batch, "--max-batch"), (args.replies, "--replies"),
                        (args.sequential_max_clients, "--sequential-max-clients"), (args.rounds, "--rounds")):
        if value < 1:
            raise KVBoundError(f"serve-load: {name} must be >= 1, got {value}")
    if args.interleave_chunk is not None and args.interleave_chunk < 0:
        raise KVBoundError(f"serve-load: --interleave-chunk must be >= 0, got {args.interleave_chunk}")
    budget = int(args.budget_list[0].value)
    return {"mode": args.mode, "models": models,
            "policies": [[p, budget if spec(p).needs_budget else None] for p in policies],
            "client_levels": _ints(args.client_levels, "--client-levels"), "requests": args.requests,
            "max_tokens": args.new_tokens, "max_batch": args.max_batch,
            "row_groups": _ints(args.row_groups, "--row-groups"), "replies": args.replies,
            "sequential_max_clients": args.sequential_max_clients, "threads": args.threads or 1,
            "rounds": args.rounds, "interleave_chunk": args.interleave_chunk}


def run(ctx: Context) -> None:
    s = SimpleNamespace(**ctx.options)
    (run_load if s.mode == "load" else run_determinism)(ctx, s)


# --------------------------------------------------------------------------- measuring


def _loadavg() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def _prompt(i: int) -> str:
    return (f"{QUESTIONS[i % len(QUESTIONS)].format(t=TOPICS[i % len(TOPICS)])} "
            f"Answer in a few sentences (request {i}).")


def _server(s, model: str, policy: str, budget: int | None, row_group: int, out: Path):
    server = SimpleNamespace(model=model, policy=policy, budget=budget, threads=s.threads, max_batch=s.max_batch,
                             row_group=row_group, max_queue=64, interleave_chunk=getattr(s, "interleave_chunk", None))
    proc, url, _ = start_server(server, None, out)
    import openai

    return proc, url, openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(60)


def _stream(client, model: str, prompt: str, max_tokens: int) -> dict:
    """One streamed greedy completion: its text, tokens, TTFT and the gaps between chunks."""
    sent = time.perf_counter()
    stamps, parts, usage = [], [], None
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                max_tokens=max_tokens, temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.perf_counter())
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    end = time.perf_counter()
    return {"prompt": prompt, "text": "".join(parts), "tokens": usage.completion_tokens,
            "prompt_tokens": usage.prompt_tokens, "ttft_s": (stamps[0] - sent) if stamps else end - sent,
            "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])],
            "tpot_s": (end - stamps[0]) / (usage.completion_tokens - 1) if stamps and usage.completion_tokens > 1
            else None}


def _pct(xs: list[float], q: float) -> float | None:
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


def _level(client, model: str, clients: int, requests: int, max_tokens: int, offset: int) -> dict:
    """``clients`` threads, each streaming ``requests`` completions one after another."""
    def one_client(k: int) -> list[dict]:
        return [_stream(client, model, _prompt(offset + k * requests + r), max_tokens) for r in range(requests)]

    load_before = _loadavg()
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        records = [r for rs in pool.map(one_client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    gaps = sorted(g for r in records for g in r["gaps_s"])
    ttfts = sorted(r["ttft_s"] for r in records)
    tpots = sorted(r["tpot_s"] for r in records if r["tpot_s"] is not None)
    tokens = sum(r["tokens"] for r in records)
    return {"clients": clients, "requests": len(records), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 3), "itl_p50_s": _pct(gaps, 0.5), "itl_p95_s": _pct(gaps, 0.95),
            "ttft_p50_s": _pct(ttfts, 0.5), "ttft_p95_s": _pct(ttfts, 0.95),
            "tpot_p50_s": _pct(tpots, 0.5), "tpot_p95_s": _pct(tpots, 0.95),
            "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in records),
            "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "replies": [{"prompt": r["prompt"], "text": r["text"]} for r in records]}


def _batching(before: dict, after: dict) -> dict:
    """The server's batching report with the rows per decode pass of this level only."""
    passes = after["decode_passes"] - before["decode_passes"]
    rows = after["decode_rows"] - before["decode_rows"]
    return {**after["batching"], "mean_decode_rows": round(rows / passes, 3) if passes else None,
            "decode_passes": passes, "padding_rows": after["padding_rows"] - before["padding_rows"]}


def _measure(ctx: Context, s, model: str, policy: str, budget: int | None, row_group: int, levels: list[int],
             rounds: int = 1) -> None:
    proc, url, client = _server(s, model, policy, budget, row_group, ctx.results.dir)
    try:
        _stream(client, model, "Warm up.", 4)
        if stats(url)["batching"]["mode"] == "sequential":  # one row per pass: fewer levels (time)
            levels = [c for c in levels if c <= s.sequential_max_clients]
        offset = 0  # every request of the server gets its own prompt (no conversation is reused)
        for round_ in range(rounds):
            for clients in levels:
                before = stats(url)
                level = _level(client, model, clients, s.requests, s.max_tokens, offset)
                offset += clients * s.requests
                ctx.save_run({"status": "ok", "mode": "load", "model": model, "policy": policy, "budget": budget,
                              "row_group": row_group, "round": round_, **level,
                              "batching": _batching(before, stats(url))})
                print(f"[serve-load] {model} {policy} row group {row_group}, round {round_ + 1}/{rounds}, "
                      f"{clients} clients: {level['tokens_per_s']:.1f} tok/s, load {level['loadavg_after']}",
                      file=sys.stderr, flush=True)
    finally:
        _stop(proc)


def run_load(ctx: Context, s) -> None:
    for model in s.models:
        for policy, budget in s.policies:
            _measure(ctx, s, model, policy, budget, s.row_groups[0], s.client_levels, getattr(s, "rounds", 1))
            for row_group in s.row_groups[1:]:
                _measure(ctx, s, model, policy, budget, row_group, [1])


def run_determinism(ctx: Context, s) -> None:
    prompts = [_prompt(1000 + i) for i in range(s.replies)]
    model, (policy, budget) = s.models[0], s.policies[0]
    for row_group in s.row_groups:
        proc, url, client = _server(s, model, policy, budget, row_group, ctx.results.dir)
        try:
            def ask(p: str) -> str:
                return client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                      max_tokens=s.max_tokens, temperature=0).choices[0].message.content

            load_before = _loadavg()
            alone = [ask(p) for p in prompts]
            with ThreadPoolExecutor(DETERMINISM_CLIENTS) as pool:
                together = list(pool.map(ask, prompts))
            batching = stats(url)["batching"]
        finally:
            _stop(proc)
        differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
        ctx.save_run({"status": "ok", "mode": "determinism", "model": model, "policy": policy, "budget": budget,
                      "row_group": row_group, "replies": len(prompts), "differ": len(differ),
                      "max_tokens": s.max_tokens, "loadavg_before": load_before, "loadavg_after": _loadavg(),
                      "batching": batching, "examples": [{"prompt": prompts[i], "alone": alone[i],
                                                          "concurrent": together[i]} for i in differ[:3]]})


# --------------------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f} ms"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}×"


def _decode_rate(r: dict) -> float | None:
    """Aggregate decode tokens/s of a level, prefill excluded: clients / median seconds per token of a request."""
    return r["clients"] / r["tpot_p50_s"] if r.get("tpot_p50_s") else None


def _load_table(runs: list[dict], o: dict) -> list[str]:
    lines = [f"Streamed greedy `/v1/chat/completions` (one user message) through the `openai` client, at most "
             f"{o.get('max_tokens', '?')} tokens per reply (a reply may end earlier at EOS; tokens/s counts tokens "
             f"made), {o.get('requests', '?')} requests per client per level, prompts of "
             f"~{runs[0]['prompt_tokens_median']:.0f} tokens (context <= prompt + {o.get('max_tokens', '?')}); "
             f"`--max-batch {o.get('max_batch', '?')}`, {o.get('threads', '?')} torch threads per server. "
             "ITL: gaps between streamed chunks, client side (a chunk is a token unless detokenizing holds text back: "
             "tiny-llama's random text often is, so its ITL is not meaningful); per-token: (last chunk - first "
             "chunk) / (tokens - 1) of each request; decode tokens/s: clients / per-token p50 (the level's "
             "aggregate rate once every reply streams, prefill waits excluded); tokens/s: all completion tokens "
             "/ the level's wall time (prefill and TTFT included). `row group`: the batch is padded to a multiple "
             "of it (batch invariance); `1` is the unpadded single-row path.", "",
             "| model | policy | row group | clients | tokens/s | × 1 client | ITL p50 | ITL p95 | p95 × 1 client | "
             "TTFT p50 | TTFT p95 | per-token p50 / p95 | decode tokens/s | × 1 client | mean rows/pass | "
             "load avg (1 min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base = {_series(r): r for r in runs if r["clients"] == 1}
    for r in runs:
        b = base.get(_series(r), r)
        rate, base_rate = _decode_rate(r), _decode_rate(b)
        lines.append(
            f"| {r['model']} | {r['policy']}{'' if r['budget'] is None else ' ' + str(r['budget'])} | "
            f"{r['row_group']} | {r['clients']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}× | {_ms(r['itl_p50_s'])} | {_ms(r['itl_p95_s'])} | "
            f"{_ratio(r['itl_p95_s'], b['itl_p95_s'])} | {_ms(r['ttft_p50_s'])} | {_ms(r['ttft_p95_s'])} | "
            f"{_ms(r['tpot_p50_s'])} / {_ms(r['tpot_p95_s'])} | {'-' if rate is None else f'{rate:.1f}'} | "
            f"{_ratio(rate, base_rate)} | {r['batching']['mean_decode_rows']} ({r['batching']['mode']}) | "
            f"{r['loadavg_after'][0]:.1f} |")
    return lines


def _series(r: dict) -> tuple:
    """The runs one 1-client level is the baseline of: same server, same round."""
    return r["model"], r["policy"], r["row_group"], r.get("round", 0)


MEDIAN_COLUMNS = ((lambda r: r.get("tokens_per_s"), "tokens/s", "{:.1f}"),
                  (lambda r: _decode_rate(r), "decode tokens/s", "{:.1f}"),
                  (lambda r: r.get("itl_p50_s"), "ITL p50", "ms"), (lambda r: r.get("itl_p95_s"), "ITL p95", "ms"))


def _medians(runs: list[dict]) -> list[str]:
    """With several rounds: per server and client count, the median of each measure and the median
    (min–max) of its per-round ratio to the same round's 1-client level."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["policy"], r["budget"], r["row_group"], r["clients"]), []).append(r)
    if not any(len(rs) > 1 for rs in groups.values()):
        return []
    base = {_series(r): r for r in runs if r["clients"] == 1}
    head = " | ".join(f"{label} | × 1 client (min–max)" for _, label, _ in MEDIAN_COLUMNS)
    lines = ["", "## Medians over rounds", "",
             "Each measure's median over the rounds; each ratio is taken against the same round's 1-client "
             "level of the same server, and its median (min–max) over the rounds is shown.", "",
             f"| model | policy | row group | clients | rounds | {head} |",
             "|---|---|---|---|---|" + "---|---|" * len(MEDIAN_COLUMNS)]
    for (model, policy, budget, row_group, clients), rs in groups.items():
        cells = []
        for get, _, fmt in MEDIAN_COLUMNS:
            values = [get(r) for r in rs if get(r) is not None]
            ratios = sorted(get(r) / get(base[_series(r)]) for r in rs
                            if get(r) is not None and _series(r) in base and get(base[_series(r)]))
            med = statistics.median(values) if values else None
            value = "-" if med is None else (_ms(med) if fmt == "ms" else fmt.format(med))
            ratio = "-" if not ratios else f"{statistics.median(ratios):.2f}× ({ratios[0]:.2f}–{ratios[-1]:.2f})"
            cells.append(f"{value} | {ratio}")
        lines.append(f"| {model} | {policy}{'' if budget is None else ' ' + str(budget)} | {row_group} | {clients} | "
                     f"{len(rs)} | {' | '.join(cells)} |")
    return lines


def plot(runs: list[dict], path: Path) -> bool:
    """Tokens/s and ITL p95 against clients, one column per model; False when no curve has 2 points."""
    plt = pyplot()
    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    drawn = False
    for col, model in enumerate(models):
        mine = [r for r in runs if r["model"] == model]
        for key in sorted({(r["policy"], r["row_group"]) for r in mine}):
            by_clients: dict[int, list[dict]] = {}
            for r in mine:
                if (r["policy"], r["row_group"]) == key:
                    by_clients.setdefault(r["clients"], []).append(r)
            if len(by_clients) < 2:
                continue
            drawn = True
            label = f"{key[0]} (row group {key[1]})"
            xs = sorted(by_clients)  # several rounds: the median of each level
            axes[0][col].plot(xs, [statistics.median(r["tokens_per_s"] for r in by_clients[c]) for c in xs],
                              marker="o", label=label)
            axes[1][col].plot(xs, [statistics.median((r["itl_p95_s"] or 0) for r in by_clients[c]) * 1000 for c in xs],
                              marker="o", label=label)
        axes[0][col].set_title(f"{model}: aggregate tokens/s (TTFT included)")
        axes[0][col].set_ylabel("tokens/s")
        axes[1][col].set_ylabel("inter-token latency p95 (ms)")
        for ax in axes[:, col]:
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        if drawn:
            axes[0][col].legend(fontsize=8)
    if drawn:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    runs = [r for r in data["runs"] if r.get("status", "ok") == "ok"]
    load = [r for r in runs if r.get("mode", "load") == "load"]
    determinism = [r for r in runs if r.get("mode") == "determinism"]
    lines = ["# kvbound serve: continuous batching (load, determinism)", "", meta_section(data)]
    plots = []
    if load:
        lines += ["", *_load_table(load, data["meta"].get("options", {})), *_medians(load)]
        if plot(load, out / "throughput.png"):
            plots.append("throughput.png")
            lines += ["", "![tokens/s and ITL p95 against concurrent clients](throughput.png)"]
    for d in determinism:
        lines += ["", f"Determinism ({d['model']}, {d['policy']}, row group {d['row_group']}): "
                      f"**{d['differ']} / {d['replies']}** greedy replies of {d['max_tokens']} tokens differ between "
                      f"the request alone and at {DETERMINISM_CLIENTS} concurrent clients "
                      f"(load {d['loadavg_after'][0]:.1f})."]
    if not runs:
        lines += ["", "Not finished."]
    return "\n".join(lines) + "\n", plots
