"""``kvbound serve``: the OpenAI-compatible server (:mod:`kvbound.serve`) on one port."""

from __future__ import annotations

import sys

import torch

from ..errors import KVBoundError
from . import common

EXAMPLES_SERVE = """\
examples:
  kvbound serve --policy full --memory-budget 256MiB --port 8000
  kvbound serve --model tiny-llama --policy kv-direct --budget 32 --memory-budget 1MB
  kvbound serve --store redis://127.0.0.1:6379/0          # conversations survive a restart
  kvbound serve --replicas 2 --store redis://127.0.0.1:6379/0 --threads 1   # Ray Serve, docs/scaling.md
  curl localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi!"}], "temperature": 0}'
"""


def add(sub) -> None:
    serve = sub.add_parser(
        "serve", help="OpenAI-compatible chat server; idle conversations parked as token ids under --memory-budget",
        description="Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, "
                    "/v1/models, /health, /stats). Each conversation keeps one cache under --policy; a request "
                    "continues the stored conversation that shares its longest token prefix. When the caches of "
                    "all conversations hold more than --memory-budget, the least recently used idle ones are "
                    "parked as token ids (4 bytes per token) and restored by a prefill on their next request: with an "
                    "exact policy the replies are those of a server without a budget. "
                    "Needs the serve extra: pip install 'kvbound[serve]'.",
        epilog=common.epilog(EXAMPLES_SERVE), formatter_class=common.FORMATTER)
    from ..batching import ROW_GROUP
    from ..serve.config import INTERLEAVE_CHUNK
    from ..generation import DEFAULT_PREFILL_CHUNK
    from ..models import DEFAULT_MODEL

    g = serve.add_argument_group("model and cache")
    g.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME",
                   help=f"built-in name, model folder, .gguf file or hub id; clients ask for it by this name "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--policy", default="full", metavar="NAME", help="each conversation's cache policy (default: full)")
    g.add_argument("--budget", type=int, metavar="N", help="tokens of K/V kept hot per layer (policies that need one)")
    g.add_argument("--option", type=common.option, action="append", default=[], metavar="KEY=VALUE",
                   help="policy option (repeatable)")
    s = serve.add_argument_group("server")
    s.add_argument("--memory-budget", metavar="SIZE",
                   help="bytes all hot conversations' caches may hold, e.g. 64MiB, 1GB or 1000000 "
                        "(default: no limit, nothing is parked)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--max-queue", type=int, default=16, metavar="N",
                   help="requests that may wait for the model; more are answered 429 (default: 16)")
    s.add_argument("--max-conversations", type=int, default=4096, metavar="N",
                   help="conversations stored, hot or parked; the least recently used is forgotten (default: 4096)")
    s.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK, metavar="N",
                   help=f"prompt tokens per forward pass when prefilling or restoring (default: {DEFAULT_PREFILL_CHUNK})")
    s.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="conversations whose next tokens are decoded together in one forward pass (continuous "
                        "batching; policies that cannot run batched decode one conversation per pass) (default: 8)")
    s.add_argument("--row-group", type=int, default=ROW_GROUP, metavar="N",
                   help="pad each batched pass to a multiple of N rows so a greedy reply does not depend on the "
                        f"conversations it shares passes with; 1: no padding, fastest alone (default: {ROW_GROUP})")
    s.add_argument("--interleave-chunk", type=int, default=INTERLEAVE_CHUNK, metavar="N",
                   help="while other conversations decode, prompt tokens per forward pass, cut at multiples of N "
                        "positions, so a new prompt delays the others' next token by a small piece; 0: whole "
                        f"--prefill-chunk chunks (default: {INTERLEAVE_CHUNK})")
    s.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    c = serve.add_argument_group("shared store and cluster (the cluster extra: pip install 'kvbound[cluster]')")
    c.add_argument("--store", metavar="URL",
                   help="write every conversation's token ids through to Redis (redis://host:port/db or "
                        "unix:///path/redis.sock): a restarted server or another replica restores them")
    c.add_argument("--store-ttl", type=int, default=86400, metavar="SECONDS",
                   help="seconds a stored conversation lives after its last turn (default: 86400)")
    c.add_argument("--replicas", type=int, metavar="N",
                   help="run N engines as Ray Serve replicas behind one endpoint, conversations routed by "
                        "affinity (X-Session-Id, user, or the first turns); needs --store to fail over")
    c.add_argument("--address", metavar="RAY_ADDRESS",
                   help="an existing Ray cluster to join (e.g. auto or ray://head:10001; default: start a local one)")
    serve.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from ..generation import check_chunk
    from ..serve.config import ServeConfig, parse_size

    try:
        import uvicorn

        from ..serve import create_app
    except ImportError as exc:
        raise KVBoundError(f"kvbound serve needs the serve extra ({exc.name} is missing): "
                           "pip install 'kvbound[serve]'") from None
    if not 0 < args.port < 65536:
        raise KVBoundError(f"--port must be 1..65535, got {args.port}")
    if args.threads is not None:
        if args.threads < 1:
            raise KVBoundError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    check_chunk(args.prefill_chunk)
    if args.interleave_chunk < 0:
        raise KVBoundError(f"--interleave-chunk must be >= 0 tokens (0: off), got {args.interleave_chunk}")
    config = ServeConfig(model=args.model, policy=args.policy, budget=args.budget, options=dict(args.option),
                         memory_budget=None if args.memory_budget is None else parse_size(args.memory_budget),
                         max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                         max_conversations=args.max_conversations, store=args.store, store_ttl=args.store_ttl,
                         max_batch=args.max_batch, row_group=args.row_group,
                         interleave_chunk=args.interleave_chunk or None)
    if args.store is not None:  # an unreachable store fails now, before the model loads
        from ..serve.redis_store import connect_store

        connect_store(args.store, args.model, ttl_s=args.store_ttl).close()
    if args.replicas is not None or args.address is not None:
        from ..serve.cluster import run_cluster

        run_cluster(config, replicas=1 if args.replicas is None else args.replicas, host=args.host, port=args.port,
                    address=args.address, threads=args.threads)
        return 0
    sock = listen(args.host, args.port)  # a taken port fails here, before the model loads
    with sock:
        app = create_app(config)
        print(f"kvbound serve: {args.model} ({args.policy} cache) on http://{args.host}:{args.port}/v1",
              file=sys.stderr)
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


def listen(host: str, port: int):
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        raise KVBoundError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock

