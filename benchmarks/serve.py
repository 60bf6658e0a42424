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
                         memory_budget=args.memory_budget, max_queue=4)
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
           "--policy", args.policy, "--threads", str(args.threads)]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    if memory_budget is not None:
        cmd += ["--memory-budget", str(memory_budget)]
    proc = subprocess.Popen(cmd)
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
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--ready-file", help=argparse.SUPPRESS)
    p.add_argument("--memory-budget", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
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
