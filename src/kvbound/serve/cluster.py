"""``kvbound serve --replicas N``: N kvbound engines as Ray Serve replicas behind one OpenAI endpoint.

- :class:`KVBoundReplica` (a Ray Serve deployment, N replicas): one :class:`~.engine.Engine` with its
  own memory budget, hot caches and parking, and kvbound's own FastAPI app (:mod:`.app`), which it
  runs in-process for every forwarded request -- the same API, errors and streaming as one server.
- :class:`KVBoundIngress` (one replica, no model): the HTTP endpoint. It computes a request's routing
  key (:mod:`.affinity`) and forwards the request to the replica the key hashes to, through
  :class:`AffinityRouter`: Ray Serve's consistent-hash router
  (``ray.serve.experimental.consistent_hash_router``; a rendezvous-hash :class:`RequestRouter` if
  that experimental module moves). A replica that dies mid-request gives a retryable 503 with
  ``Retry-After``; its conversations hash to the other replicas, which restore them from the shared
  Redis store (:mod:`.redis_store`) or from the request itself. ``/stats`` and ``/health`` ask every
  replica and sum.

Entry points: :func:`run_cluster` (the CLI) and :func:`app_builder` for ``serve run`` on an existing
Ray cluster (``serve run kvbound.serve.cluster:app_builder model=tiny-llama replicas=2
store=redis://...``; see ``docs/scaling.md``). Needs the ``cluster`` extra.
"""


import asyncio
import hashlib
import json
import os
import sys
import threading
import time
from typing import Any, AsyncIterator

from ..errors import KVBoundError
from ..rss import reset_peak_rss
from .affinity import affinity
from .config import ServeConfig
from .redis_store import connect_store
from .schemas import APIError

try:
    import ray
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from ray.serve.config import RequestRouterConfig
except ImportError as _exc:  # pragma: no cover - the message is the point
    raise KVBoundError(f"kvbound serve --replicas needs the cluster extra ({_exc.name} is missing): "
                       "pip install 'kvbound[cluster]'") from None

try:
    from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter as _RouterBase

    CONSISTENT_HASH = True
except ImportError:  # the experimental API moved: our own rendezvous hashing
    from ray.serve.request_router import RequestRouter as _RouterBase

    CONSISTENT_HASH = False

APP_NAME = "kvbound"
ENGINE = "KVBoundReplica"
TARGET = "replica:"  # a session id that names one replica: /stats and /health ask each replica
REPLICA_HEADER = "x-kvbound-replica"
STATS_TIMEOUT_S = 10.0
SUMMED = ("conversations", "hot", "parked", "hot_kv_bytes", "held_bytes", "parked_tokens", "parked_bytes",
          "token_id_bytes", "prefix_hits", "reused_tokens", "restores", "shared_restores", "parks", "dropped",
          "requests_served", "requests_cancelled", "requests_failed", "prompt_tokens", "prefilled_tokens",
          "completion_tokens", "queued", "store_writes", "store_reads", "store_hits", "store_refused",
          "store_errors", "store_skipped")


def rendezvous(key: str, replica_ids: list[str]) -> str:
    """Highest-random-weight hashing: the replica for ``key``; removing a replica moves only its keys."""
    return max(replica_ids, key=lambda r: hashlib.blake2b(f"{r}|{key}".encode(), digest_size=8).digest())


class AffinityRouter(_RouterBase):
    """Routes by the request's session id (the routing key the ingress computed): consistent hashing
    over the live replicas; a session id ``replica:<id>`` goes to that replica (per-replica stats)."""

    def _get_pending_request_matching_metadata(self, request_metadata=None):
        """The pending request a chosen replica was chosen *for*. Ray Serve's base router hands a
        replica to the oldest pending request unless this matches one, which swaps concurrent
        requests between replicas and breaks affinity under load."""
        if request_metadata is None:
            return None
        for pending in self._pending_requests_to_fulfill:
            meta = pending.metadata
            if (not pending.future.done() and meta.internal_request_id == request_metadata.internal_request_id
                    and meta.session_id == request_metadata.session_id):
                return pending
        return None

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        key = pending_request.metadata.session_id if pending_request is not None else ""
        if key.startswith(TARGET):
            want = [r for r in candidate_replicas if r.replica_id.unique_id == key[len(TARGET):]]
            return [want or candidate_replicas]  # gone: any replica answers (the ingress dedupes)
        if CONSISTENT_HASH:
            return await super().choose_replicas(candidate_replicas, pending_request)
        key = key or (pending_request.metadata.internal_request_id if pending_request is not None else "")
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rendezvous(key, sorted(by_id))]]]


# ----------------------------------------------------------------------------------- the replica
async def asgi_call(app, method: str, path: str, query: str, headers: list[tuple[str, str]],
                    body: bytes) -> AsyncIterator[Any]:
    """One HTTP request through an ASGI app in this process: yields ``(status, headers)``, then body
    chunks. Closing the generator early (the client went away) cancels the app's handler."""
    out: asyncio.Queue = asyncio.Queue()
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        out.put_nowait(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": query.encode(), "headers": [(k.lower().encode("latin-1"), v.encode("latin-1"))
                                                          for k, v in headers],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 80)}
    task = asyncio.ensure_future(app(scope, receive, send))
    task.add_done_callback(lambda _t: out.put_nowait(None))
    try:
        while True:
            message = await out.get()
            if message is None:
                if task.exception() is not None:
                    raise task.exception()
                return
            if message["type"] == "http.response.start":
                yield message["status"], [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message["headers"]]
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
    finally:
        gone.set()
        if not task.done():
            task.cancel()


class KVBoundReplica:
    """One kvbound engine (model, conversation store, model worker) as a Ray Serve replica."""

    def __init__(self, config: ServeConfig, threads: int = 1) -> None:
        import torch

        from .app import create_app

        torch.set_num_threads(threads)
        self.app = create_app(config)
        self.engine = self.app.state.engine
        with torch.no_grad():  # touch every weight now (memory-mapped ones load on first use)
            self.engine.model(input_ids=torch.zeros(1, 1, dtype=torch.long))
        self.engine.start()  # the app's lifespan does not run in-process: start the worker here
        reset_peak_rss()  # /stats' peak_rss_bytes: the serving peak, not the model load's transient
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.in_flight = 0  # forwarded requests not finished yet

    async def forward(self, method: str, path: str, query: str, headers: list[tuple[str, str]], body: bytes):
        """Run one HTTP request through this replica's kvbound app; streams (status, headers), then bytes."""
        self.in_flight += 1
        try:
            async for item in asgi_call(self.app, method, path, query, headers, body):
                if isinstance(item, tuple):
                    status, head = item
                    yield status, head + [(REPLICA_HEADER, self.replica_id)]
                else:
                    yield item
        finally:
            self.in_flight -= 1

    def stats(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "pid": os.getpid(), "in_flight": self.in_flight, **self.engine.stats()}

    def health(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "worker_alive": self.engine.worker.alive, **self.engine.health()}

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose model worker died is replaced."""
        if not self.engine.worker.alive:
            raise RuntimeError("the model worker is not running")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


# ----------------------------------------------------------------------------------- the ingress
api = FastAPI(title="kvbound serve (Ray Serve)")
_HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "date", "server"}


def _error(exc: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _replica_gone(exc: BaseException) -> APIError:
    return APIError(503, f"the replica serving this conversation is unavailable ({type(exc).__name__}); retry: "
                         "another replica will restore the conversation", type="server_error",
                    code="replica_unavailable")


@serve.ingress(api)
class KVBoundIngress:
    """The endpoint: routes each request by its affinity key; /stats and /health cover every replica."""

    def __init__(self, engine, app_name: str = APP_NAME) -> None:
        self.engine = engine
        self.prefix = f"SERVE_REPLICA::{app_name}#{ENGINE}#"

    def replica_ids(self) -> list[str]:
        """The engine replicas alive now (Ray's named replica actors)."""
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(n["name"][len(self.prefix):] for n in names if n["name"].startswith(self.prefix))

    async def _each(self, method: str) -> tuple[dict[str, dict], list[str]]:
        ids = self.replica_ids()

        async def ask(rid: str):
            call = getattr(self.engine.options(session_id=TARGET + rid), method).remote()
            return await asyncio.wait_for(call, STATS_TIMEOUT_S)

        answers = []
        for rid in ids:  # one at a time: Ray Serve's router may hand a replica to the oldest pending request
            try:
                answers.append(await ask(rid))
            except Exception as exc:  # noqa: BLE001 -- a replica that is gone or stuck is reported
                answers.append(exc)
        got, failed = {}, []
        for rid, answer in zip(ids, answers):
            if isinstance(answer, BaseException):
                failed.append(rid)
            else:
                got[answer["replica"]] = answer
        return got, [r for r in failed if r not in got]

    @api.get("/stats")
    async def stats(self) -> JSONResponse:
        per, unreachable = await self._each("stats")
        total = {k: sum(s.get(k) or 0 for s in per.values()) for k in SUMMED}
        stores = [s.get("store_up") for s in per.values() if "store_up" in s]
        total["store_up"] = all(stores) if stores else None
        return JSONResponse({"replicas": per, "unreachable": unreachable, "num_replicas": len(per), "total": total,
                             "router": "consistent-hash" if CONSISTENT_HASH else "rendezvous"})

    @api.get("/health")
    async def health(self) -> JSONResponse:
        per, unreachable = await self._each("health")
        if not per:
            return _error(APIError(503, "no kvbound replica is serving", type="server_error",
                                   code="service_unavailable"))
        ok = all(h["status"] == "ok" for h in per.values()) and not unreachable
        body = {"status": "ok" if ok else "degraded", "replicas": per, "unreachable": unreachable}
        stores = [h["store_up"] for h in per.values() if "store_up" in h]
        if stores:
            body["store_up"] = all(stores)
        return JSONResponse(body)

    @api.api_route("/{path:path}", methods=["GET", "POST"])
    async def forward(self, request: Request, path: str):
        body = await request.body()
        try:
            parsed = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            parsed = None  # the replica answers the 400
        try:
            route = affinity(parsed, request.headers).route
        except APIError as exc:
            return _error(exc)
        call = self.engine.options(stream=True, session_id=route).forward
        stream = call.remote(request.method, request.url.path, request.url.query, list(request.headers.items()),
                             body)
        try:
            status, headers = await stream.__anext__()
        except (ray.exceptions.RayError, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            return _error(_replica_gone(exc))
        except StopAsyncIteration:
            return _error(_replica_gone(RuntimeError("empty reply")))
        head = {k: v for k, v in headers if k.lower() not in _HOP_HEADERS}

        async def rest() -> AsyncIterator[bytes]:
            try:
                async for chunk in stream:
                    yield chunk
            except ray.exceptions.RayError as exc:  # died mid-stream: an error event, as the server sends
                yield f"data: {json.dumps(_replica_gone(exc).body())}\n\n".encode()
            finally:
                stream.cancel()

        return StreamingResponse(rest(), status_code=status, headers=head)


# ----------------------------------------------------------------------------------- entry points
def build_app(config: ServeConfig, replicas: int, threads: int = 1, max_ongoing_requests: int = 64,
              app_name: str = APP_NAME):
    """The Ray Serve application: ``replicas`` engines (no CPU reserved: torch threads are the knob)
    behind one ingress. Run it with ``serve.run(build_app(...), name=app_name, route_prefix="/")``."""
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise KVBoundError(f"--replicas must be a whole number >= 1, got {replicas!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise KVBoundError(f"--threads must be >= 1, got {threads!r}")
    router = RequestRouterConfig(request_router_class=f"{__name__}.AffinityRouter",
                                 request_router_kwargs={"num_fallback_replicas": 0} if CONSISTENT_HASH else {})
    engine = serve.deployment(KVBoundReplica, name=ENGINE).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=max_ongoing_requests,
        request_router_config=router, health_check_period_s=2, health_check_timeout_s=30,
        graceful_shutdown_timeout_s=5)
    ingress = serve.deployment(KVBoundIngress, name="KVBoundIngress").options(
        num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(engine.bind(config, threads), app_name)


def app_builder(args: dict[str, str]):
    """``serve run kvbound.serve.cluster:app_builder model=... replicas=2 store=redis://... policy=full
    memory_budget=64MiB threads=1 store_ttl=86400``: the same application on an existing Ray cluster."""
    args = dict(args)
    replicas = int(args.pop("replicas", "1"))
    threads = int(args.pop("threads", "1"))
    config = ServeConfig(**_config_args(args))
    check_store(config)
    return build_app(config, replicas, threads)


def _config_args(args: dict[str, str]) -> dict[str, Any]:
    ints = {"budget", "max_queue", "prefill_chunk", "max_conversations", "store_ttl", "interleave_chunk"}
    known = ints | {"model", "policy", "memory_budget", "store"}
    bad = sorted(set(args) - known)
    if bad:
        raise KVBoundError(f"unknown argument(s) {', '.join(bad)}; known: replicas, threads, {', '.join(sorted(known))}")
    return {k: int(v) if k in ints else v for k, v in args.items()}


def check_store(config: ServeConfig) -> None:
    """Fail fast, with one line, when the shared store cannot be reached (before any replica starts)."""
    if config.store is not None:
        connect_store(config.store, config.model, ttl_s=config.store_ttl).close()


def run_cluster(config: ServeConfig, replicas: int, host: str, port: int, address: str | None = None,
                threads: int | None = None) -> None:
    """``kvbound serve --replicas N``: start (or join, ``address``) Ray, serve until interrupted."""
    app = build_app(config, replicas, 1 if threads is None else threads)  # bad --replicas: before Ray starts
    check_store(config)
    if config.store is None and replicas > 1:
        print("kvbound serve: no --store: a conversation that moves replicas is rebuilt from the request alone",
              file=sys.stderr)
    # no --address: a new local cluster ("local"), never the latest one /tmp/ray/ray_current_cluster names
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name=APP_NAME, route_prefix="/")
        print(f"kvbound serve: {config.model} ({config.policy} cache), {replicas} Ray Serve replica(s) on "
              f"http://{host}:{port}/v1", file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        _bounded_serve_shutdown()
        ray.shutdown()


SHUTDOWN_S = 30  # seconds Ray Serve's graceful shutdown may take before the CLI stops Ray anyway


def _bounded_serve_shutdown(timeout: float = SHUTDOWN_S) -> None:
    """``serve.shutdown()`` (drain and stop the replicas), given at most ``timeout`` seconds: on SIGINT
    to the CLI's process group it once waited past 180 s (a full long-test run; cause not found)."""
    done = threading.Event()

    def stop() -> None:
        try:
            serve.shutdown()
        finally:
            done.set()

    threading.Thread(target=stop, name="kvbound-serve-shutdown", daemon=True).start()
    if not done.wait(timeout):
        print(f"kvbound serve: Ray Serve did not shut down in {timeout:g} s; stopping Ray", file=sys.stderr)
