"""Bench scenario ``cluster``: kvbound serve on Ray Serve replicas, one replica killed halfway.

``python -m kvbound.bench.cluster --conversations 1000 --turns 3 --replicas 2`` (a module of its own
until ``kvbound bench`` has a scenario registry):

1. an unbounded single server (in this process) answers every conversation: the reference replies;
2. Ray Serve with ``--replicas`` engines and a real Redis store answers them again, with client
   threads playing conversations concurrently; after half the requests one replica is killed
   (``ray.kill``), in the middle of turn ``turns // 2 + 1`` (turns are played round by round: every
   conversation's turn 1, then every turn 2, ...). Requests in flight on it get a retryable 503, which the ``openai`` client retries;
   its conversations continue on the other replicas. Counted: conversations lost (a turn that failed
   after the client's retries), replies that differ from the reference, peak RSS per replica;
3. throughput (requests/s) of 1 replica and of ``--replicas`` replicas on the same requests, no kill.

Results: ``results.json`` and ``report.md`` in ``--out``. Needs the ``cluster`` extra and ``redis-server``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

from ..errors import KVBoundError


@contextlib.contextmanager
def spawn_redis(folder: str) -> Iterator[str]:
    """A throwaway ``redis-server`` on a unix socket in ``folder`` (no persistence); yields its URL."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise KVBoundError("redis-server is not installed (apt-get install -y redis-server)")
    sock = os.path.join(folder, "redis.sock")
    proc = subprocess.Popen([exe, "--port", "0", "--unixsocket", sock, "--save", "", "--appendonly", "no",
                             "--dir", folder], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise KVBoundError("redis-server did not start")
        time.sleep(0.02)
    try:
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def openings(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a terse assistant."},
             {"role": "user", "content": f"Conversation {i}: tell me about topic number {i * 7 % 101}."}]
            for i in range(n)]


FOLLOW_UPS = ["Tell me more.", "Why is that?", "Give an example.", "Summarize.", "And then?"]


class Player:
    """Plays conversations turn by turn against one endpoint; records replies, failures, timings."""

    def __init__(self, url: str, model: str, max_tokens: int, retries: int) -> None:
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=retries, timeout=300)
        self.model, self.max_tokens = model, max_tokens
        self.done = 0
        self.lock = threading.Lock()

    def turn(self, conv: dict[str, Any], t: int, on_request=None) -> None:
        """Turn ``t`` of one conversation (``{"msgs", "replies", "lost"}``); a failure marks it lost."""
        if conv["lost"]:
            return
        try:
            out = self.client.chat.completions.create(model=self.model, messages=conv["msgs"],
                                                      max_tokens=self.max_tokens, temperature=0)
        except Exception as exc:  # noqa: BLE001 -- a lost conversation is the measurement
            conv["lost"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            return
        conv["replies"].append(out.choices[0].message.content)
        conv["msgs"] += [{"role": "assistant", "content": conv["replies"][-1]},
                         {"role": "user", "content": FOLLOW_UPS[t % len(FOLLOW_UPS)]}]
        with self.lock:
            self.done += 1
        if on_request is not None:
            on_request()

    def play_all(self, openings_: list[list[dict]], turns: int, clients: int,
                 on_request=None) -> tuple[list[dict], float]:
        """Every conversation's turn 1, then every turn 2, ...: each conversation is mid-way when a
        replica is killed halfway, and idle conversations pile up under the memory budget."""
        convs = [{"msgs": list(o), "replies": [], "lost": None} for o in openings_]
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            for t in range(turns):
                list(pool.map(lambda c: self.turn(c, t, on_request), convs))
        return convs, time.perf_counter() - start


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.load(r)


def reference(model: str, convs, turns: int, max_tokens: int, clients: int, threads: int) -> tuple[list[dict], float]:
    """The unbounded single server's replies (uvicorn in a thread of this process)."""
    import torch
    import uvicorn

    from ..serve import ServeConfig, create_app

    torch.set_num_threads(threads)
    app = create_app(ServeConfig(model=model, max_queue=4096, max_conversations=100_000))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        return Player(f"http://127.0.0.1:{sock.getsockname()[1]}", model, max_tokens, 0).play_all(convs, turns, clients)
    finally:
        server.should_exit = True
        thread.join(60)


@contextlib.contextmanager
def ray_cluster(config, replicas: int, threads: int, port: int) -> Iterator[str]:
    """The kvbound application on Ray Serve (started on ``port`` by the caller), deleted afterwards."""
    from ray import serve

    from ..serve.cluster import APP_NAME, build_app

    serve.run(build_app(config, replicas, threads), name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(APP_NAME)


def kill_one_replica(url: str) -> str:
    import ray

    from ..serve.cluster import APP_NAME, ENGINE

    stats = _get(url + "/stats")
    victim = max(stats["replicas"], key=lambda r: stats["replicas"][r]["conversations"])
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#{victim}", namespace="serve"), no_restart=True)
    return victim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvbound.bench.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--conversations", type=int, default=1000)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--clients", type=int, default=8, help="concurrent client threads")
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (and for the reference)")
    p.add_argument("--memory-budget", default="1MiB", help="each replica's --memory-budget")
    p.add_argument("--throughput-conversations", type=int, default=200,
                   help="conversations for the 1-vs-N replica throughput runs (0: skip)")
    p.add_argument("--out", default="benchmarks/results/cluster")
    args = p.parse_args(argv)
    import ray

    from ..serve import ServeConfig

    os.makedirs(args.out, exist_ok=True)
    record: dict[str, Any] = {"command": "python -m kvbound.bench.cluster " + " ".join(argv or sys.argv[1:]),
                              "args": vars(args), "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                              "loadavg_start": open("/proc/loadavg").read().split()[:3]}
    convs = openings(args.conversations)
    total = args.conversations * args.turns
    print(f"reference: unbounded single server, {total} requests", file=sys.stderr)
    ref, ref_s = reference(args.model, convs, args.turns, args.max_tokens, args.clients, args.threads)
    record["reference"] = {"seconds": ref_s, "requests_per_s": total / ref_s}

    with tempfile.TemporaryDirectory() as folder, spawn_redis(folder) as redis_url:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            from ray import serve

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = ServeConfig(model=args.model, memory_budget=args.memory_budget, store=redis_url,
                                 max_queue=4096, max_conversations=100_000)
            with ray_cluster(config, args.replicas, args.threads, port) as url:
                start_stats = _get(url + "/stats")
                player = Player(url, args.model, args.max_tokens, retries=8)
                killed: dict[str, Any] = {}

                def maybe_kill() -> None:
                    if player.done >= total // 2 and not killed:
                        killed["at_request"] = player.done
                        killed["stats_before"] = _get(url + "/stats")
                        killed["replica"] = kill_one_replica(url)
                        print(f"killed replica {killed['replica']} after {player.done} requests", file=sys.stderr)

                kill_lock = threading.Lock()

                def on_request() -> None:
                    if not killed and player.done >= total // 2:
                        with kill_lock:
                            maybe_kill()

                print(f"cluster: {args.replicas} replicas, {total} requests, one replica killed halfway",
                      file=sys.stderr)
                out, run_s = player.play_all(convs, args.turns, args.clients, on_request)
                end_stats = _get(url + "/stats")
            lost = [i for i, o in enumerate(out) if o["lost"]]
            differ = [i for i, (o, r) in enumerate(zip(out, ref)) if not o["lost"] and o["replies"] != r["replies"]]
            per_replica = {}
            for snap in (start_stats, killed.get("stats_before", {"replicas": {}}), end_stats):
                for rid, s in snap["replicas"].items():
                    entry = per_replica.setdefault(rid, {"rss_after_load": s["rss_bytes"]})
                    entry["peak_rss"] = max(entry.get("peak_rss", 0), s["peak_rss_bytes"])
                    entry["requests_served"] = s["requests_served"]
                    entry["restores"], entry["shared_restores"] = s["restores"], s["shared_restores"]
            budget = config.memory_budget
            for entry in per_replica.values():
                entry["peak_over_load_plus_budget"] = entry["peak_rss"] / (entry["rss_after_load"] + budget)
            record["failover"] = {
                "replicas": args.replicas, "requests": total, "seconds": run_s, "requests_per_s": total / run_s,
                "killed": {k: v for k, v in killed.items() if k != "stats_before"},
                "conversations_lost": len(lost), "lost_examples": [out[i]["lost"] for i in lost[:5]],
                "replies_identical": sum(x == y for o, rf in zip(out, ref) for x, y in zip(o["replies"], rf["replies"])),
                "conversations_differing": len(differ), "per_replica": per_replica,
                "memory_budget_bytes": budget, "end_totals": end_stats["total"],
            }
            print(json.dumps(record["failover"], indent=1)[:2000], file=sys.stderr)

            if args.throughput_conversations:
                sub = convs[:args.throughput_conversations]
                n_req = len(sub) * args.turns
                record["throughput"] = {"requests": n_req}
                import redis

                for n in sorted({1, args.replicas}):
                    redis.Redis.from_url(redis_url).flushall()  # every run starts with an empty store
                    with ray_cluster(config, n, args.threads, port) as url:
                        _, secs = Player(url, args.model, args.max_tokens, 8).play_all(sub, args.turns, args.clients)
                    record["throughput"][f"{n}_replicas"] = {"seconds": secs, "requests_per_s": n_req / secs,
                                                             "loadavg": open("/proc/loadavg").read().split()[:3]}
                    print(f"{n} replica(s): {n_req / secs:.2f} requests/s", file=sys.stderr)
                one, many = record["throughput"]["1_replicas"], record["throughput"][f"{args.replicas}_replicas"]
                record["throughput"]["speedup"] = many["requests_per_s"] / one["requests_per_s"]
        finally:
            serve.shutdown()
            ray.shutdown()
    record["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(record, f, indent=1)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(report(record))
    print(report(record))
    return 0


def report(r: dict) -> str:
    a, fo = r["args"], r["failover"]
    lines = [f"# kvbound serve on Ray Serve: {a['conversations']} conversations x {a['turns']} turns, "
             f"{fo['replicas']} replicas, one killed halfway", "",
             f"`{r['command']}` -- model `{a['model']}`, policy `full`, greedy, {a['max_tokens']} tokens a reply, "
             f"{a['clients']} concurrent clients (`openai` SDK, retries on 5xx), turns played round by round (every "
             f"conversation's turn 1, then every turn 2, ...), {a['threads']} torch thread(s) a "
             f"replica, `--memory-budget {a['memory_budget']}` a replica, Redis store on a unix socket. "
             f"Machine: {r['machine']['cpus']} cores (shared with other jobs); load average at start "
             f"{' '.join(r['loadavg_start'])}, at end {' '.join(r['loadavg_end'])}.", "",
             f"- **Conversations lost: {fo['conversations_lost']}** of {a['conversations']}.",
             f"- **Replies identical to an unbounded single server's: {fo['replies_identical']} / {fo['requests']}** "
             f"({fo['conversations_differing']} conversations differ).",
             f"- Replica `{fo['killed'].get('replica')}` killed after {fo['killed'].get('at_request')} requests.",
             f"- Wall: {fo['seconds']:.0f} s ({fo['requests_per_s']:.1f} requests/s); the reference single server: "
             f"{r['reference']['seconds']:.0f} s ({r['reference']['requests_per_s']:.1f} requests/s).", "",
             "| replica | requests served | restores (from Redis) | RSS after load | peak RSS | peak / (load + budget) |",
             "|---|---|---|---|---|---|"]
    for rid, e in fo["per_replica"].items():
        lines.append(f"| {rid} | {e['requests_served']} | {e['restores']} ({e['shared_restores']}) | "
                     f"{e['rss_after_load'] / 2**20:.1f} MiB | {e['peak_rss'] / 2**20:.1f} MiB | "
                     f"{e['peak_over_load_plus_budget']:.3f} |")
    if "throughput" in r:
        t = r["throughput"]
        lines += ["", f"Throughput on the first {t['requests'] // a['turns']} conversations ({t['requests']} requests), "
                      "no kill, same settings:", "", "| replicas | seconds | requests/s | load average after |",
                  "|---|---|---|---|"]
        for k, v in t.items():
            if k.endswith("_replicas"):
                lines.append(f"| {k.split('_')[0]} | {v['seconds']:.1f} | {v['requests_per_s']:.2f} | "
                             f"{' '.join(v['loadavg'])} |")
        lines += ["", f"- **Speed-up, {a['replicas']} replicas / 1: {t['speedup']:.2f}x.**"]
    lines += ["", "Raw numbers: `results.json`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
