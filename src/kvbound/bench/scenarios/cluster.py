"""``cluster``: ``kvbound serve`` on Ray Serve replicas sharing a Redis store, one replica killed halfway.

``kvbound bench --scenario cluster --model tiny-llama --conversations 1000 --turns 3 --replicas 2``:

1. an unbounded single server (in this process) answers every conversation: the reference replies;
2. Ray Serve with ``--replicas`` engines and a real Redis store answers them again, with ``--clients``
   threads playing conversations concurrently; after half the requests one replica is killed
   (``ray.kill``), in the middle of turn ``turns // 2 + 1`` (turns are played round by round: every
   conversation's turn 1, then every turn 2, ...). Requests in flight on it get a retryable 503, which
   the ``openai`` client retries; its conversations continue on the other replicas. Counted:
   conversations lost (a turn that failed after the client's retries), replies that differ from the
   reference, peak RSS per replica against (RSS after loading + ``--memory-budget``);
3. throughput (requests/s) of 1 replica and of ``--replicas`` replicas on
   ``--throughput-conversations`` conversations, no kill: each client plays whole conversations (a
   turn after the previous reply, no round barrier); the CPU seconds each replica used are recorded.

Policy ``full``, greedy, ``--max-new-tokens`` a reply (default 8), ``--threads`` torch threads a
replica (default 1). Needs the ``cluster`` extra (ray, redis) and ``redis-server``. Loads no model in
the bench process (the reference server and the replicas load it).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

from ...errors import KVBoundError
from ..render import meta_section
from ..runner import Context

NEEDS_MODEL = False
DEFAULT_NEW_TOKENS = 8

SUMMARY = "kvbound serve on Ray Serve + Redis, one replica killed halfway: lost, identical replies, RSS, req/s"


def add_arguments(group) -> None:
    group.add_argument("--replicas", type=int, default=2, help="cluster: Ray Serve replicas (default: 2)")
    group.add_argument("--clients", type=int, default=8, help="cluster: concurrent client threads (default: 8)")
    group.add_argument("--memory-budget", default="1MiB",
                       help="cluster: each replica's kvbound serve --memory-budget (default: 1MiB)")
    group.add_argument("--throughput-conversations", type=int, default=200,
                       help="cluster: conversations for the 1-vs-N replica throughput runs (0: skip; default: 200)")


def options(args) -> dict[str, Any]:
    from ...serve.config import parse_size

    s = {"policies": ["full"], "model": args.model, "conversations": 1000 if args.conversations is None else args.conversations,
         "turns": args.turns or 3, "max_tokens": args.new_tokens, "replicas": args.replicas, "clients": args.clients,
         "threads": args.threads or 1, "memory_budget": args.memory_budget,
         "throughput_conversations": args.throughput_conversations}
    if s["conversations"] < 1 or s["replicas"] < 1 or s["clients"] < 1 or s["throughput_conversations"] < 0:
        raise KVBoundError("cluster needs --conversations, --replicas, --clients >= 1 and --throughput-conversations >= 0")
    if args.policies and args.policy_list != ["full"]:
        raise KVBoundError("cluster runs policy full only (the replicas park by --memory-budget)")
    parse_size(s["memory_budget"])  # one-line error on a malformed size, before anything starts
    for module in ("ray", "redis", "openai", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            raise KVBoundError(f"cluster needs {module!r} (pip install 'kvbound[cluster]')") from None
    if shutil.which("redis-server") is None:
        raise KVBoundError("cluster needs redis-server (apt-get install -y redis-server)")
    return s


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


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

    def play_each(self, openings_: list[list[dict]], turns: int, clients: int) -> tuple[list[dict], float]:
        """Each client plays whole conversations, one turn after the other's reply (as chat users do):
        no round barrier, so every client keeps a request in flight until the conversations run out."""
        convs = [{"msgs": list(o), "replies": [], "lost": None} for o in openings_]

        def play(conv: dict[str, Any]) -> None:
            for t in range(turns):
                self.turn(conv, t)

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(play, convs))
        return convs, time.perf_counter() - start


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.load(r)


def reference(model: str, convs, turns: int, max_tokens: int, clients: int, threads: int) -> tuple[list[dict], float]:
    """The unbounded single server's replies (uvicorn in a thread of this process)."""
    import torch
    import uvicorn

    from ...serve import ServeConfig, create_app

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

    from ...serve.cluster import APP_NAME, build_app

    serve.run(build_app(config, replicas, threads), name=APP_NAME, route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(APP_NAME)


def replica_cpu(url: str) -> dict[str, float]:
    """CPU seconds (user + system) each replica process has used so far, by replica id."""
    import psutil

    out = {}
    for rid, r in _get(url + "/stats")["replicas"].items():
        with contextlib.suppress(psutil.Error, KeyError, TypeError):
            t = psutil.Process(r["pid"]).cpu_times()
            out[rid] = t.user + t.system
    return out


def kill_one_replica(url: str) -> str:
    import ray

    from ...serve.cluster import APP_NAME, ENGINE

    stats = _get(url + "/stats")
    victim = max(stats["replicas"], key=lambda r: stats["replicas"][r]["conversations"])
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#{victim}", namespace="serve"), no_restart=True)
    return victim


def run(ctx: Context) -> None:
    """Reference, failover and throughput runs, each saved as soon as it is measured."""
    import ray

    from ...serve import ServeConfig

    s = SimpleNamespace(**ctx.options)
    convs = openings(s.conversations)
    total = s.conversations * s.turns
    print(f"reference: unbounded single server, {total} requests", file=sys.stderr)
    ref, ref_s = reference(s.model, convs, s.turns, s.max_tokens, s.clients, s.threads)
    ctx.save_run({"status": "ok", "kind": "reference", "requests": total, "seconds": ref_s,
                  "requests_per_s": total / ref_s})

    with tempfile.TemporaryDirectory() as folder, spawn_redis(folder) as redis_url:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            from ray import serve

            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            config = ServeConfig(model=s.model, memory_budget=s.memory_budget, store=redis_url,
                                 max_queue=4096, max_conversations=100_000)
            ctx.save_run({"status": "ok", "kind": "failover", **failover(s, config, port, convs, ref)})
            if s.throughput_conversations:
                import redis

                sub = openings(s.throughput_conversations)
                n_req = len(sub) * s.turns
                for n in sorted({1, s.replicas}):
                    redis.Redis.from_url(redis_url).flushall()  # every run starts with an empty store
                    with ray_cluster(config, n, s.threads, port) as url:
                        cpu0 = replica_cpu(url)
                        played, secs = Player(url, s.model, s.max_tokens, 8).play_each(sub, s.turns, s.clients)
                        cpu = {r: replica_cpu(url).get(r, 0.0) - c for r, c in cpu0.items()}
                    ctx.save_run({"status": "ok", "kind": "throughput", "replicas": n, "requests": n_req,
                                  "seconds": secs, "requests_per_s": n_req / secs, "loadavg": _loadavg(),
                                  "lost": sum(1 for c in played if c["lost"]),
                                  "replica_cpu_s": {r: round(v, 2) for r, v in cpu.items()}})
                    print(f"{n} replica(s): {n_req / secs:.2f} requests/s, replica CPU s {cpu}", file=sys.stderr)
        finally:
            serve.shutdown()
            ray.shutdown()


def failover(s, config, port: int, convs: list[list[dict]], ref: list[dict]) -> dict[str, Any]:
    """Play every conversation on ``s.replicas`` replicas, killing one after half the requests."""
    total = s.conversations * s.turns
    with ray_cluster(config, s.replicas, s.threads, port) as url:
        start_stats = _get(url + "/stats")
        player = Player(url, s.model, s.max_tokens, retries=8)
        killed: dict[str, Any] = {}
        kill_lock = threading.Lock()

        def on_request() -> None:
            if not killed and player.done >= total // 2:
                with kill_lock:
                    if not killed:
                        killed["at_request"] = player.done
                        killed["stats_before"] = _get(url + "/stats")
                        killed["replica"] = kill_one_replica(url)
                        print(f"killed replica {killed['replica']} after {player.done} requests", file=sys.stderr)

        print(f"cluster: {s.replicas} replicas, {total} requests, one replica killed halfway", file=sys.stderr)
        out, run_s = player.play_all(convs, s.turns, s.clients, on_request)
        end_stats = _get(url + "/stats")
    lost = [i for i, o in enumerate(out) if o["lost"]]
    differ = [i for i, (o, r) in enumerate(zip(out, ref)) if not o["lost"] and o["replies"] != r["replies"]]
    per_replica: dict[str, dict[str, Any]] = {}
    for snap in (start_stats, killed.get("stats_before", {"replicas": {}}), end_stats):
        for rid, st in snap["replicas"].items():
            entry = per_replica.setdefault(rid, {"rss_after_load": st["rss_bytes"]})
            entry["peak_rss"] = max(entry.get("peak_rss", 0), st["peak_rss_bytes"])
            entry["requests_served"] = st["requests_served"]
            entry["restores"], entry["shared_restores"] = st["restores"], st["shared_restores"]
    budget = config.memory_budget
    for entry in per_replica.values():
        entry["peak_over_load_plus_budget"] = entry["peak_rss"] / (entry["rss_after_load"] + budget)
    return {
        "replicas": s.replicas, "requests": total, "seconds": run_s, "requests_per_s": total / run_s,
        "killed": {k: v for k, v in killed.items() if k != "stats_before"},
        "conversations_lost": len(lost), "lost_examples": [out[i]["lost"] for i in lost[:5]],
        "replies_identical": sum(x == y for o, rf in zip(out, ref) for x, y in zip(o["replies"], rf["replies"])),
        "conversations_differing": len(differ), "per_replica": per_replica,
        "memory_budget_bytes": budget, "end_totals": end_stats["total"],
    }


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    a = SimpleNamespace(**data["meta"]["options"])
    runs = [r for r in data["runs"] if r.get("status", "ok") == "ok"]
    ref = next((r for r in runs if r.get("kind") == "reference"), None)
    fo = next((r for r in runs if r.get("kind") == "failover"), None)
    title = (f"# kvbound serve on Ray Serve: {a.conversations} conversations x {a.turns} turns, "
             f"{a.replicas} replicas, one killed halfway")
    lines = [title, "", meta_section(data), "",
             f"Model `{a.model}`, policy `full`, greedy, {a.max_tokens} tokens a reply, {a.clients} concurrent "
             f"clients (`openai` SDK, retries on 5xx), turns played round by round (every conversation's turn 1, "
             f"then every turn 2, ...), {a.threads} torch thread(s) a replica, `--memory-budget {a.memory_budget}` "
             f"a replica, Redis store on a unix socket.", ""]
    if fo is None:
        failed = [f"- {r.get('kind', 'run')}: {r.get('status')} -- {r.get('reason', '')}"
                  for r in data["runs"] if r.get("status", "ok") != "ok"]
        return "\n".join(lines + ["Not finished." if not failed else "\n".join(failed), ""]), []
    lines += [f"- **Conversations lost: {fo['conversations_lost']}** of {a.conversations}."
              + ("" if not fo["lost_examples"] else f" First: {fo['lost_examples'][0]}"),
              f"- **Replies identical to an unbounded single server's: {fo['replies_identical']} / {fo['requests']}** "
              f"({fo['conversations_differing']} conversations differ).",
              f"- Replica `{fo['killed'].get('replica')}` killed after {fo['killed'].get('at_request')} requests.",
              f"- Wall: {fo['seconds']:.0f} s ({fo['requests_per_s']:.1f} requests/s)"
              + ("" if ref is None else f"; the reference single server: {ref['seconds']:.0f} s "
                                        f"({ref['requests_per_s']:.1f} requests/s)") + ".", "",
              "| replica | requests served | restores (from Redis) | RSS after load | peak RSS | peak / (load + budget) |",
              "|---|---|---|---|---|---|"]
    for rid, e in fo["per_replica"].items():
        lines.append(f"| {rid} | {e['requests_served']} | {e['restores']} ({e['shared_restores']}) | "
                     f"{e['rss_after_load'] / 2**20:.1f} MiB | {e['peak_rss'] / 2**20:.1f} MiB | "
                     f"{e['peak_over_load_plus_budget']:.3f} |")
    tp = sorted((r for r in runs if r.get("kind") == "throughput"), key=lambda r: r["replicas"])
    if tp:
        whole = "replica_cpu_s" in tp[0]  # newer runs: clients play whole conversations, replica CPU recorded
        how = ("each client plays whole conversations, a turn after the previous reply" if whole
               else "turns played round by round")
        lines += ["", f"Throughput on {tp[0]['requests'] // a.turns} conversations ({tp[0]['requests']} requests), "
                      f"no kill, same settings ({how}):", "",
                  "| replicas | seconds | requests/s | CPU s per replica (busy share) | load average after |",
                  "|---|---|---|---|---|"]
        for r in tp:
            cpu = r.get("replica_cpu_s") or {}
            busy = ", ".join(f"{v:.1f} ({v / r['seconds']:.0%})" for v in cpu.values()) or "not recorded"
            lines.append(f"| {r['replicas']} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} | {busy} | "
                         f"{' '.join(str(x) for x in r['loadavg'])} |")
        if len(tp) > 1:
            lines += ["", f"- **Speed-up, {tp[-1]['replicas']} replicas / 1: "
                          f"{tp[-1]['requests_per_s'] / tp[0]['requests_per_s']:.2f}x.**"]
    lines += ["", "Raw numbers: `results.json`.", ""]
    return "\n".join(lines), []


