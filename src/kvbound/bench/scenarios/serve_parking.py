"""``serve-parking``: ``kvbound serve`` under a memory budget. ``--conversations`` chats of
``--turns`` turns are played round-robin through the real ``openai`` client (streaming, greedy
replies of ``--max-new-tokens``) twice, each against a fresh server process: without a memory budget
(every conversation stays hot), then with a budget of ``--hot-fraction`` of the bytes the first
server's caches held at the end, so the rest are parked as token ids. Round-robin is LRU's worst case:
every request after the first turn restores its conversation (a chunked prefill of all of it).

Reported: each server's peak RSS and its cache's share (peak minus the RSS after loading and warming
up the model, the high-water mark reset there), whether every reply is identical between the two
runs, and the time to first token (client side) of each request, paired by (conversation, turn).
Needs the ``serve`` extra (uvicorn, openai). Loads no model in the bench process.
"""

from __future__ import annotations

import argparse
import gc
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ...errors import KVBoundError
from ..render import meta_section
from ..runner import Context

NEEDS_MODEL = False
DEFAULT_NEW_TOKENS = 8

SUMMARY = "kvbound serve with and without a memory budget: RSS, identical replies, TTFT"


def add_arguments(group) -> None:
    group.add_argument("--hot-fraction", type=float, default=0.1,
                       help="serve-parking: memory budget as a share of the unbounded run's cache bytes (default: 0.1)")
    group.add_argument("--reuse-unbounded", metavar="RESULTS_JSON",
                       help="serve-parking: take the unbounded run from an earlier results.json")


def options(args) -> dict[str, Any]:
    policies = args.policy_list if args.policies else ["full"]
    if len(policies) != 1:
        raise KVBoundError("serve-parking runs one policy (--policies NAME)")
    conversations = 50 if args.conversations is None else args.conversations
    if conversations < 1 or not 0 < args.hot_fraction <= 1:
        raise KVBoundError("serve-parking needs --conversations >= 1 and --hot-fraction in (0,1]")
    from ..runner import spec

    budget = int(args.budget_list[0].value) if args.budgets and spec(policies[0]).needs_budget else None
    return {"model": args.model, "policy": policies[0], "budget": budget, "conversations": conversations,
            "turns": args.turns or 10, "max_tokens": args.new_tokens, "hot_fraction": args.hot_fraction,
            "threads": args.threads or 2, "reuse_unbounded": args.reuse_unbounded}


def run(ctx: Context) -> None:
    s = SimpleNamespace(**ctx.options)
    out = ctx.results.dir
    if s.reuse_unbounded:  # the unbounded run of an earlier results.json (same settings)
        earlier = json.loads(Path(s.reuse_unbounded).read_text())
        hot = next(r for r in earlier["runs"] if r["label"] == "unbounded")
        hot["reused_from"] = str(s.reuse_unbounded)
    else:
        hot = run_server(s, None, "unbounded", out)
    ctx.save_run({"status": "ok", **hot})
    parked = run_server(s, int(s.hot_fraction * hot["stats"]["held_bytes"]), "budgeted", out)
    ctx.save_run({"status": "ok", **parked})
    ctx.results.set_extra("summary", summarize(hot, parked))


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    runs = [r for r in data["runs"] if r.get("status", "ok") == "ok"]
    if len(runs) < 2:
        return f"# kvbound serve: parking under a memory budget\n\n{meta_section(data)}\n\nNot finished.\n", []
    args = SimpleNamespace(**data["meta"]["options"])
    summary = data["extra"].get("summary") or summarize(runs[0], runs[1])
    return report(args, runs[0], runs[1], summary, meta_section(data)), []


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

    from ...cache import make_cache
    from ...generation import prefill
    from ...models import load
    from ...rss import current_rss_bytes, reset_peak_rss
    from ...serve import ServeConfig, create_app
    from ...serve.store import _return_memory_to_os

    torch.set_num_threads(args.threads)
    model, tok = load(args.model)
    batching = {k: getattr(args, k) for k in ("max_batch", "row_group") if getattr(args, k, None) is not None}
    if getattr(args, "interleave_chunk", None) is not None:  # 0: whole prefill chunks while others decode
        batching["interleave_chunk"] = args.interleave_chunk or None
    config = ServeConfig(model=args.model, policy=args.policy, budget=args.budget, memory_budget=args.memory_budget,
                         max_queue=args.max_queue or 4, **batching)
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
    """A fresh ``kvbound serve`` child process for ``args`` (model, policy, budget, threads; optional
    max_batch, row_group, max_queue, interleave_chunk): ``(process, base url, RSS baseline)`` once it answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ready = workdir / f"ready-{port}.json"
    cmd = [sys.executable, "-m", __name__, "--child", "--port", str(port), "--ready-file", str(ready), "--model", args.model,
           "--policy", args.policy, "--threads", str(args.threads)]
    if args.budget is not None:
        cmd += ["--budget", str(args.budget)]
    if memory_budget is not None:
        cmd += ["--memory-budget", str(memory_budget)]
    for name in ("max_batch", "row_group", "max_queue", "interleave_chunk"):
        if getattr(args, name, None) is not None:
            cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    proc = subprocess.Popen(cmd)
    import urllib.request

    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise KVBoundError(f"the kvbound serve child process exited with {proc.returncode}")
        if ready.exists():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                pass
        if time.monotonic() > deadline:
            proc.kill()
            raise KVBoundError("the kvbound serve child process did not start within 600 s")
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


def run_server(args, memory_budget: int | None, label: str, workdir: Path) -> dict:
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


def report(args, hot: dict, parked: dict, summary: dict, meta: str) -> str:
    lines = [
        "# kvbound serve: parking under a memory budget",
        "",
        meta,
        "",
        f"{args.conversations} conversations x {args.turns} turns, {args.max_tokens} new tokens per reply, "
        f"{args.threads} torch threads -- model `{args.model}`, policy `{args.policy}`"
        f"{'' if args.budget is None else f' (budget {args.budget})'}, greedy, streamed through the `openai` client; "
        f"chats played round-robin (every request after turn 1 finds its conversation parked in the budgeted run). "
        f"Memory budget = {args.hot_fraction:.0%} of the bytes the unbounded server's "
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
    lines += ["", "Raw per-request records: the `requests` of each run in `results.json`."]
    return "\n".join(lines) + "\n"




def _child_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="serve-parking server")
    p.add_argument("--child", action="store_true")
    for name in ("--model", "--policy", "--ready-file"):
        p.add_argument(name)
    for name in ("--port", "--threads", "--budget", "--memory-budget", "--max-batch", "--row-group", "--max-queue",
                 "--interleave-chunk"):
        p.add_argument(name, type=int)
    child(p.parse_args(argv))


if __name__ == "__main__":  # the server process of one run
    _child_main()
