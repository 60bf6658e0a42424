"""Parking under a memory budget: ``kvbound serve`` with and without ``--memory-budget``.

``--conversations`` chats (default 50) of ``--turns`` turns (default 10) are played round-robin
(turn 1 of every chat, then turn 2, ...) through the real ``openai`` client with streaming and
greedy replies of ``--max-tokens`` tokens, twice, each time against a fresh server process:

1. no memory budget: every conversation stays hot;
2. a memory budget of ``--hot-fraction`` (default 10%) of the bytes the caches held at the end of
   run 1, so about that share of conversations stays hot and the rest are parked as token ids.
   Round-robin is the worst case for LRU: every request after the first turn restores its
   conversation (a fresh cache and a chunked prefill of the whole conversation).

Reported: the server's peak RSS and its cache's share (peak RSS minus the RSS after loading and
warming up the model, with the high-water mark reset there), whether every reply is identical,
and the time to first token (TTFT, client side: request sent -> first streamed chunk) of each
request, paired by (conversation, turn) between the hot run and the parked run.

Usage: ``python benchmarks/serve.py [--conversations 50] [--turns 10] [--max-tokens 8]
[--threads 2] [--out benchmarks/results/serve]``

``--load``: continuous batching under load (:mod:`kvbound.batching`). For each model and policy a
fresh server; ``--clients`` (default 1,4,8,16) concurrent clients each stream ``--requests``
greedy completions of ``--max-tokens`` tokens; reported per level: aggregate tokens/s (completion
tokens / wall time of the level), time to first token and inter-token latency (client side, gaps
between streamed chunks) p50/p95. ``--determinism``: ``--replies`` distinct greedy requests sent one
at a time, then by 8 concurrent clients, to one fresh server per ``--row-groups`` value; counts the
replies that differ. Load results go to ``--out`` (default benchmarks/results/serve-batching).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["volcanoes", "honey bees", "the moon", "bicycles", "chess", "rain", "bread", "libraries", "whales",
          "trains", "gardens", "music", "glaciers", "maps", "coffee", "owls", "bridges", "deserts", "paper",
          "clocks", "rivers", "salt", "kites", "forests", "cheese", "lighthouses", "ants", "snow", "castles",
          "tea", "comets", "violins", "islands", "wolves", "soap", "mirrors", "caves", "apples", "sailing",
          "dinosaurs", "ink", "bamboo", "thunder", "penguins", "glass", "markets", "stars", "wool", "tides",
          "lanterns"]
QUESTIONS = ["Tell me one fact about {t}.", "Why are {t} interesting?", "Give an example related to {t}.",
             "What is a common mistake about {t}?", "Summarize {t} in one sentence.", "Who cares about {t}?",
             "What came before {t}?", "Explain {t} to a child.", "Name a word that goes with {t}.",
             "One last thought on {t}?"]


# --------------------------------------------------------------------------- the server process


def child(args) -> None:
    """Run one server: load, warm up, reset the RSS high-water mark, write the baseline, serve."""
    import torch
    import uvicorn

    from kvbound import make_cache
    from kvbound.generation import prefill
    from kvbound.models import load
    from kvbound.rss import current_rss_bytes, reset_peak_rss
    from kvbound.serve import ServeConfig, create_app
    from kvbound.serve.store import _return_memory_to_os

    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    config = ServeConfig(model=args.model, policy=args.policy, budget=args.budget,
                         memory_budget=args.memory_budget, max_queue=args.max_queue, max_batch=args.max_batch,
                         row_group=args.row_group)
    app = create_app(config, model=model, tokenizer=tok)
    warm = make_cache(model, "full")  # one-time lazy initialisations (kernels, thread pools)
    prefill(model, torch.arange(100, 164)[None], warm, 32)
    del warm
    gc.collect()
    _return_memory_to_os()
    reset = reset_peak_rss()
    Path(args.ready_file).write_text(json.dumps({"baseline_rss_bytes": current_rss_bytes(), "peak_reset": reset}))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def start_server(args, memory_budget: int | None, workdir: Path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ready = workdir / f"ready-{port}.json"
    cmd = [sys.executable, __file__, "--child", "--port", str(port), "--ready-file", str(ready), "--model", args.model,
           "--policy", args.policy, "--threads", str(args.threads), "--max-batch", str(args.max_batch),
           "--row-group", str(args.row_group), "--max-queue", str(args.max_queue)]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    if memory_budget is not None:
        cmd += ["--memory-budget", str(memory_budget)]
    proc = subprocess.Popen(cmd)  # inherits the niceness of the benchmark (run it under nice)
    import urllib.request

    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        if ready.exists():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("server did not start")
        time.sleep(0.5)
    baseline = json.loads(ready.read_text())
    ready.unlink()
    return proc, f"http://127.0.0.1:{port}", baseline


def stats(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/stats") as r:
        return json.load(r)


# --------------------------------------------------------------------------- one run


def play(args, url: str, label: str) -> list[dict]:
    """All turns, round-robin; returns one record per request."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    history = {c: [] for c in range(args.conversations)}
    records = []
    for turn in range(args.turns):
        for c in range(args.conversations):
            topic = TOPICS[c % len(TOPICS)]
            history[c].append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)].format(t=topic)})
            sent = time.perf_counter()
            first = None
            parts = []
            stream = client.chat.completions.create(model=args.model, messages=history[c], max_tokens=args.max_tokens,
                                                    temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
            usage = None
            for chunk in stream:
                if first is None:
                    first = time.perf_counter() - sent
                if chunk.choices:
                    parts.append(chunk.choices[0].delta.content or "")
                if chunk.usage is not None:
                    usage = chunk.usage
            total = time.perf_counter() - sent
            reply = "".join(parts)
            history[c].append({"role": "assistant", "content": reply})
            records.append({"conversation": c, "turn": turn, "ttft_s": round(first, 5), "total_s": round(total, 5),
                            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                            "reply": reply})
            print(f"[{label}] turn {turn + 1}/{args.turns} chat {c + 1}/{args.conversations}: "
                  f"ttft {first:.3f}s total {total:.3f}s prompt {usage.prompt_tokens}", file=sys.stderr, flush=True)
    return records


def run(args, memory_budget: int | None, label: str, workdir: Path) -> dict:
    proc, url, baseline = start_server(args, memory_budget, workdir)
    try:
        start = time.perf_counter()
        records = play(args, url, label)
        wall = time.perf_counter() - start
        final = stats(url)
    finally:
        proc.terminate()
        proc.wait(60)
    peak = final["peak_rss_bytes"]
    return {"label": label, "memory_budget": memory_budget, "wall_s": round(wall, 1), **baseline,
            "peak_rss_bytes": peak, "cache_share_bytes": peak - baseline["baseline_rss_bytes"],
            "stats": final, "requests": records}


# --------------------------------------------------------------------------- report


def _mib(b: float) -> str:
    return f"{b / 2**20:.1f} MiB"


def summarize(hot: dict, parked: dict) -> dict:
    pairs = [(a, b) for a, b in zip(hot["requests"], parked["requests"])]
    identical = sum(a["reply"] == b["reply"] for a, b in pairs)
    later = [(a, b) for a, b in pairs if a["turn"] > 0]  # first turns are new conversations in both runs
    per_turn = {}
    for a, b in pairs:
        t = per_turn.setdefault(a["turn"] + 1, {"hot": [], "parked": [], "prompt": []})
        t["hot"].append(a["ttft_s"])
        t["parked"].append(b["ttft_s"])
        t["prompt"].append(a["prompt_tokens"])
    return {
        "replies": len(pairs), "identical_replies": identical,
        "first_difference": next(({"conversation": a["conversation"], "turn": a["turn"] + 1, "hot": a["reply"],
                                   "parked": b["reply"]} for a, b in pairs if a["reply"] != b["reply"]), None),
        "cache_share_ratio": parked["cache_share_bytes"] / hot["cache_share_bytes"],
        "ttft_hot_median_s": statistics.median(a["ttft_s"] for a, _ in later),
        "ttft_parked_median_s": statistics.median(b["ttft_s"] for _, b in later),
        "ttft_ratio_median": statistics.median(b["ttft_s"] / a["ttft_s"] for a, b in later),
        "per_turn": {t: {"prompt_tokens_median": statistics.median(v["prompt"]),
                         "ttft_hot_median_s": statistics.median(v["hot"]),
                         "ttft_parked_median_s": statistics.median(v["parked"])} for t, v in per_turn.items()},
    }


def report(args, hot: dict, parked: dict, summary: dict) -> str:
    lines = [
        "# kvbound serve: parking under a memory budget",
        "",
        f"`python benchmarks/serve.py --conversations {args.conversations} --turns {args.turns} "
        f"--max-tokens {args.max_tokens} --threads {args.threads}` -- model `{args.model}`, policy `{args.policy}`"
        f"{'' if args.budget is None else f' (budget {args.budget})'}, greedy, streamed through the `openai` client; "
        f"chats played round-robin (every request after turn 1 finds its conversation parked in the budgeted run). "
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{args.threads} torch threads. Memory budget = {args.hot_fraction:.0%} of the bytes the unbounded server's "
        f"caches held at the end.",
        "",
        *([f"The unbounded run is reused from `{hot['reused_from']}` (same settings, measured earlier on the same "
           "box); its TTFTs and the budgeted run's were measured at different times on a shared machine, so "
           "per-turn medians carry load noise.", ""] if hot.get("reused_from") else []),
        "| server | memory budget | hot / parked at end | cache bytes held at end | parked token ids | peak RSS | "
        "RSS after load | cache share of peak RSS | wall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (hot, parked):
        s = r["stats"]
        budget = "none" if r["memory_budget"] is None else _mib(r["memory_budget"])
        lines.append(f"| {r['label']} | {budget} | {s['hot']} / {s['parked']} | {_mib(s['held_bytes'])} | "
                     f"{s['parked_bytes']:,} B ({s['parked_tokens']:,} tokens) | {_mib(r['peak_rss_bytes'])} | "
                     f"{_mib(r['baseline_rss_bytes'])} | {_mib(r['cache_share_bytes'])} | {r['wall_s']:.0f} s |")
    lines += [
        "",
        f"- **Cache share of peak RSS, budgeted / unbounded: {summary['cache_share_ratio']:.3f}×** "
        f"(goal ≤ 0.2×).",
        f"- **Replies identical: {summary['identical_replies']} / {summary['replies']}.**"
        + ("" if summary["first_difference"] is None else f" First difference: {summary['first_difference']}"),
        f"- Restores in the budgeted run: {parked['stats']['restores']}, parks: {parked['stats']['parks']}.",
        f"- **Time to first token, turns 2..{args.turns}: hot median {summary['ttft_hot_median_s'] * 1000:.0f} ms, "
        f"parked (restored) median {summary['ttft_parked_median_s'] * 1000:.0f} ms; median per-request ratio "
        f"{summary['ttft_ratio_median']:.1f}×.** A restore re-prefills the whole conversation (chunked), a hot "
        f"conversation only the new turn.",
        "",
        "| turn | prompt tokens (median) | TTFT hot (median) | TTFT parked (median) |",
        "|---|---|---|---|",
    ]
    for t, v in summary["per_turn"].items():
        lines.append(f"| {t} | {v['prompt_tokens_median']:.0f} | {v['ttft_hot_median_s'] * 1000:.0f} ms | "
                     f"{v['ttft_parked_median_s'] * 1000:.0f} ms |")
    lines += ["", "Raw per-request records: `results.json`."]
    return "\n".join(lines) + "\n"

# --------------------------------------------------------------------------- continuous batching (--load, --determinism)


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _prompt(i: int) -> str:
    return (f"{QUESTIONS[i % len(QUESTIONS)].format(t=TOPICS[i % len(TOPICS)])} "
            f"Answer in a few sentences (request {i}).")


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
            "gaps_s": [b - a for a, b in zip(stamps, stamps[1:])], "sent": sent, "end": end,
            "tpot_s": (end - stamps[0]) / (usage.completion_tokens - 1) if stamps and usage.completion_tokens > 1
            else None}


def _level(client, model: str, clients: int, requests: int, max_tokens: int, offset: int) -> dict:
    """``clients`` threads, each streaming ``requests`` completions one after another."""
    from concurrent.futures import ThreadPoolExecutor

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

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None

    return {"clients": clients, "requests": len(records), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 3), "itl_p50_s": pct(gaps, 0.5), "itl_p95_s": pct(gaps, 0.95),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p95_s": pct(ttfts, 0.95),
            "tpot_p50_s": pct(tpots, 0.5), "tpot_p95_s": pct(tpots, 0.95),
            "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in records),
            "loadavg_before": load_before, "loadavg_after": _loadavg(),
            "replies": [{"prompt": r["prompt"], "text": r["text"]} for r in records]}


def _server(args, model: str, policy: str, budget: int | None, row_group: int, workdir: Path):
    run_args = argparse.Namespace(**{**vars(args), "model": model, "policy": policy, "budget": budget,
                                     "row_group": row_group, "max_queue": 64, "max_batch": args.max_batch})
    return start_server(run_args, None, workdir)


def _batching(before: dict, after: dict) -> dict:
    """The server's batching report with the rows per decode pass of this level only."""
    passes = after["decode_passes"] - before["decode_passes"]
    rows = after["decode_rows"] - before["decode_rows"]
    return {**after["batching"], "mean_decode_rows": round(rows / passes, 3) if passes else None,
            "decode_passes": passes, "padding_rows": after["padding_rows"] - before["padding_rows"]}


def _policies(text: str) -> list[tuple[str, int | None]]:
    out = []
    for item in text.split(","):
        name, _, budget = item.partition(":")
        out.append((name, int(budget) if budget else None))
    return out


def run_load(args, out: Path, runs: list[dict], save) -> None:
    import openai

    for model in args.models.split(","):
        for policy, budget in _policies(args.policies):
            levels = [int(c) for c in args.clients.split(",")]
            if policy in args.sequential_policies.split(","):  # one row per pass: fewer levels (time)
                levels = [c for c in levels if c <= args.sequential_max_clients]
            proc, url, _ = _server(args, model, policy, budget, args.row_group, out)
            try:
                client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
                _stream(client, model, "Warm up.", 4)
                offset = 0
                for clients in levels:
                    before = stats(url)
                    level = _level(client, model, clients, args.requests, args.max_tokens, offset)
                    offset += clients * args.requests
                    level.update(model=model, policy=policy, budget=budget, row_group=args.row_group,
                                 batching=_batching(before, stats(url)))
                    runs.append(level)
                    save()
                    print(f"[load] {model} {policy} c={clients}: {level['tokens_per_s']:.1f} tok/s, ITL p50/p95 "
                          f"{level['itl_p50_s']}/{level['itl_p95_s']} s, TTFT p50 {level['ttft_p50_s']:.3f} s, "
                          f"load {level['loadavg_after']}", file=sys.stderr, flush=True)
            finally:
                proc.terminate()
                proc.wait(60)
            if args.baseline_row_group and args.baseline_row_group != args.row_group and 1 in levels:
                proc, url, _ = _server(args, model, policy, budget, args.baseline_row_group, out)
                try:
                    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
                    _stream(client, model, "Warm up.", 4)
                    before = stats(url)
                    level = _level(client, model, 1, args.requests, args.max_tokens, 0)
                    level.update(model=model, policy=policy, budget=budget, row_group=args.baseline_row_group,
                                 batching=_batching(before, stats(url)))
                    runs.append(level)
                    save()
                finally:
                    proc.terminate()
                    proc.wait(60)


def run_determinism(args, out: Path) -> dict:
    import openai
    from concurrent.futures import ThreadPoolExecutor

    prompts = [_prompt(1000 + i) for i in range(args.replies)]
    model = args.models.split(",")[0]
    policy, budget = _policies(args.policies)[0]
    results = []
    for row_group in (int(g) for g in args.row_groups.split(",")):
        proc, url, _ = _server(args, model, policy, budget, row_group, out)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)

            def ask(p: str) -> str:
                return client.chat.completions.create(model=model, messages=[{"role": "user", "content": p}],
                                                      max_tokens=args.max_tokens, temperature=0).choices[0].message.content

            load_before = _loadavg()
            alone = [ask(p) for p in prompts]
            with ThreadPoolExecutor(8) as pool:
                together = list(pool.map(ask, prompts))
            batching = stats(url)["batching"]
        finally:
            proc.terminate()
            proc.wait(60)
        differ = [i for i, (a, b) in enumerate(zip(alone, together)) if a != b]
        results.append({"model": model, "policy": policy, "budget": budget, "row_group": row_group,
                        "replies": len(prompts), "differ": len(differ), "max_tokens": args.max_tokens,
                        "loadavg_before": load_before, "loadavg_after": _loadavg(), "batching": batching,
                        "examples": [{"prompt": prompts[i], "alone": alone[i], "concurrent": together[i]}
                                     for i in differ[:3]]})
        print(f"[determinism] {model} {policy} row_group={row_group}: {len(differ)}/{len(prompts)} differ",
              file=sys.stderr, flush=True)
    return {"determinism": results}


def load_report(args, data: dict) -> str:
    lines = ["# kvbound serve: continuous batching under load", ""]
    if data.get("runs"):
        lines += [f"`{data['command']}`", "",
                  f"Streamed greedy `/v1/chat/completions` (one user message) through the `openai` client, at most "
                  f"{args.max_tokens} tokens per reply (a reply may end earlier at EOS; tokens/s counts tokens made), "
                  f"{args.requests} requests per client per level, prompts of ~{data['runs'][0]['prompt_tokens_median']:.0f} "
                  f"tokens (context <= prompt + {args.max_tokens}); `--max-batch {args.max_batch}`, "
                  f"{args.threads} torch threads, server and clients under `nice`; "
                  f"machine: {os.cpu_count()} cores shared with other jobs (load average in the table). "
                  "ITL: gaps between streamed chunks, client side (a chunk is a token unless detokenizing holds text back: "
                  "tiny-llama's random text often is, so its ITL is not meaningful); per-token: (last chunk - first "
                  "chunk) / (tokens - 1) of each request; decode tokens/s: clients / per-token p50 (the level's "
                  "aggregate rate once every reply streams, prefill waits excluded); tokens/s: all completion tokens "
                  "/ the level's wall time (prefill and TTFT included). `row group`: the batch is padded to a multiple of it "
                  "(batch invariance); `1` is the unpadded single-row path.", "",
                  "| model | policy | row group | clients | tokens/s | × 1 client | ITL p50 | ITL p95 | p95 × 1 client | "
                  "TTFT p50 | TTFT p95 | per-token p50 / p95 | decode tokens/s | × 1 client | mean rows/pass | "
                  "load avg (1 min) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = {(r["model"], r["policy"], r["row_group"]): r for r in data["runs"] if r["clients"] == 1}
        for r in data["runs"]:
            b = base.get((r["model"], r["policy"], r["row_group"]))
            ms = lambda x: "-" if x is None else f"{x * 1000:.0f} ms"  # noqa: E731
            lines.append(
                f"| {r['model']} | {r['policy']}{'' if r['budget'] is None else ' ' + str(r['budget'])} | "
                f"{r['row_group']} | {r['clients']} | {r['tokens_per_s']:.1f} | "
                f"{r['tokens_per_s'] / b['tokens_per_s']:.2f}× | {ms(r['itl_p50_s'])} | {ms(r['itl_p95_s'])} | "
                f"{_ratio(r['itl_p95_s'], b['itl_p95_s'])} | {ms(r['ttft_p50_s'])} | {ms(r['ttft_p95_s'])} | "
                f"{ms(r['tpot_p50_s'])} / {ms(r['tpot_p95_s'])} | {_decode_rate(r):.1f} | "
                f"{_decode_rate(r) / _decode_rate(b):.2f}× | "
                f"{r['batching']['mean_decode_rows']} ({r['batching']['mode']}) | {r['loadavg_after'][0]:.1f} |")
    for d in data.get("determinism", []):
        lines += ["", f"Determinism ({d['model']}, {d['policy']}, row group {d['row_group']}): "
                      f"**{d['differ']} / {d['replies']}** greedy replies of {d['max_tokens']} tokens differ between "
                      f"the request alone and at 8 concurrent clients (load {d['loadavg_after'][0]:.1f}). "
                      f"`{data.get('determinism_command', '')}`"]
    return "\n".join(lines) + "\n"


def _decode_rate(r: dict) -> float:
    """Aggregate decode tokens/s of a level, prefill excluded: clients / median seconds per token of a request."""
    return r["clients"] / r["tpot_p50_s"] if r.get("tpot_p50_s") else float("nan")


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}×"


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in data["runs"]})
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 7), squeeze=False)
    for col, model in enumerate(models):
        runs = [r for r in data["runs"] if r["model"] == model]
        for key in sorted({(r["policy"], r["row_group"]) for r in runs}):
            rs = sorted((r for r in runs if (r["policy"], r["row_group"]) == key), key=lambda r: r["clients"])
            if len(rs) < 2:
                continue
            label = f"{key[0]} (row group {key[1]})"
            axes[0][col].plot([r["clients"] for r in rs], [r["tokens_per_s"] for r in rs], marker="o", label=label)
            axes[1][col].plot([r["clients"] for r in rs], [(r["itl_p95_s"] or 0) * 1000 for r in rs], marker="o",
                              label=label)
        axes[0][col].set_title(f"{model}: aggregate tokens/s (TTFT included)")
        axes[0][col].set_ylabel("tokens/s")
        axes[1][col].set_ylabel("inter-token latency p95 (ms)")
        for ax in axes[:, col]:
            ax.set_xlabel("concurrent clients")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def load_main(args) -> None:
    out = Path(args.out if args.out != "benchmarks/results/serve" else "benchmarks/results/serve-batching")
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.json"
    data = json.loads(results.read_text()) if results.exists() else {}
    command = "nice python " + " ".join(sys.argv)
    def save() -> None:
        results.write_text(json.dumps(data, indent=1))

    if args.load:
        data.update(runs=[], command=command, args=vars(args))
        run_load(args, out, data["runs"], save)
    if args.determinism:
        data.update(run_determinism(args, out), determinism_command=command)
    save()
    shown = argparse.Namespace(**{**vars(args), **data.get("args", {})})
    (out / "report.md").write_text(load_report(shown, data))
    if data.get("runs"):
        plot(data, out / "throughput.png")
    print((out / "report.md").read_text())



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--policy", default="full")
    p.add_argument("--budget", type=int)
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--hot-fraction", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/serve")
    p.add_argument("--reuse-unbounded", metavar="RESULTS_JSON",
                   help="take the unbounded run from an earlier results.json instead of running it again")
    p.add_argument("--report-only", action="store_true", help="re-render report.md from --out/results.json")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--row-group", type=int, default=4)
    p.add_argument("--max-queue", type=int, default=4)
    p.add_argument("--load", action="store_true", help="continuous batching under load (see the docstring)")
    p.add_argument("--determinism", action="store_true", help="greedy replies at concurrency 8 vs alone")
    p.add_argument("--models", default="smollm2-135m,tiny-llama")
    p.add_argument("--policies", default="full,offload:32,kv-direct:32,window:32", help="NAME[:BUDGET],...")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=2, help="--load: requests per client per level")
    p.add_argument("--sequential-policies", default="kv-direct,residual",
                   help="--load: policies that decode one row per pass, run at fewer levels")
    p.add_argument("--sequential-max-clients", type=int, default=4)
    p.add_argument("--replies", type=int, default=104, help="--determinism: distinct requests")
    p.add_argument("--row-groups", default="4,1", help="--determinism: --row-group values")
    p.add_argument("--baseline-row-group", type=int, default=1,
                   help="--load: also run 1 client with this --row-group (0: skip)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--memory-budget", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.load or args.determinism:
        return load_main(args)
    if args.report_only:  # re-render report.md from results.json
        out = Path(args.out)
        data = json.loads((out / "results.json").read_text())
        hot, parked = data["runs"]
        (out / "report.md").write_text(report(argparse.Namespace(**{**data["args"], **{"out": args.out}}), hot, parked,
                                              data["summary"]))
        return None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.reuse_unbounded:  # the unbounded run of an earlier results.json (same settings)
        earlier = json.loads(Path(args.reuse_unbounded).read_text())
        hot = next(r for r in earlier["runs"] if r["label"] == "unbounded")
        hot["reused_from"] = str(args.reuse_unbounded)
    else:
        hot = run(args, None, "unbounded", out)
    budget = int(args.hot_fraction * hot["stats"]["held_bytes"])
    parked = run(args, budget, "budgeted", out)
    summary = summarize(hot, parked)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "summary": summary, "runs": [hot, parked]},
                                                 indent=1))
    (out / "report.md").write_text(report(args, hot, parked, summary))
    print(report(args, hot, parked, summary))


if __name__ == "__main__":
    main()
