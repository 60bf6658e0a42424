"""kvbound serve on Ray Serve: a local Ray cluster, 2 tiny-llama replicas, a real redis-server.

One module-scoped cluster (starting Ray and two replicas is most of this file's time); replicas take
no CPU reservation and one torch thread each.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("redis")
openai = pytest.importorskip("openai")

from ray import serve  # noqa: E402

from kvbound.errors import KVBoundError  # noqa: E402
from kvbound.serve import ServeConfig  # noqa: E402
from kvbound.serve.cluster import APP_NAME, ENGINE, REPLICA_HEADER, app_builder, build_app, rendezvous  # noqa: E402

from redis_fixture import free_port, redis_server  # noqa: E402
from test_redis_store import TURNS  # noqa: E402
from test_serve import serving  # noqa: E402

MODEL = "tiny-llama"
FOLLOW_UPS = TURNS + ["Why?"]  # 4 replies a conversation: 2 before the kill, 2 after


def test_rendezvous_moves_only_the_removed_replicas_keys():
    keys = [f"k{i}" for i in range(300)]
    before = {k: rendezvous(k, ["a", "b", "c"]) for k in keys}
    after = {k: rendezvous(k, ["a", "c"]) for k in keys}
    assert {before[k] for k in keys} == {"a", "b", "c"}
    assert all(after[k] == before[k] for k in keys if before[k] != "b")


def test_app_builder_refuses_bad_arguments():
    with pytest.raises(KVBoundError, match="--replicas must be a whole number >= 1, got 0"):
        app_builder({"model": MODEL, "replicas": "0"})
    with pytest.raises(KVBoundError, match="unknown argument"):
        app_builder({"model": MODEL, "colour": "blue"})
    with pytest.raises(KVBoundError, match="cannot reach the Redis store"):
        app_builder({"model": MODEL, "store": f"redis://127.0.0.1:{free_port()}/0"})
    assert app_builder({"model": MODEL, "replicas": "2", "policy": "full"}) is not None


class Cluster:
    def __init__(self, url: str, redis_url: str) -> None:
        self.url, self.redis_url = url, redis_url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=4, timeout=120)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.load(r)

    def chat(self, messages, session: str | None = None) -> tuple[str, str]:
        """The reply and the replica that served it."""
        raw = self.client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=0,
            extra_headers={"X-Session-Id": session} if session else None)
        return raw.parse().choices[0].message.content, raw.headers[REPLICA_HEADER]

    def replicas(self) -> list[str]:
        prefix = f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#"
        return sorted(n["name"][len(prefix):] for n in ray.util.list_named_actors(all_namespaces=True)
                      if n["name"].startswith(prefix))

    def kill(self, replica: str) -> None:
        actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#{replica}", namespace="serve")
        ray.kill(actor, no_restart=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as redis_url:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(ServeConfig(model=MODEL, store=redis_url), replicas=2), name=APP_NAME,
                      route_prefix="/")
            yield Cluster(f"http://127.0.0.1:{port}", redis_url)
        finally:
            serve.shutdown()
            ray.shutdown()


def _raw_chat(url: str, messages, max_tokens: int) -> tuple[int, Any, dict]:
    body = json.dumps({"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}).encode()
    req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.headers, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.load(err)


def _expected(openings: list[str]) -> dict[str, list[str]]:
    """Each conversation's replies from one unbounded single server."""
    out = {}
    with serving() as s:
        for opening in openings:
            msgs, replies = [{"role": "user", "content": opening}], []
            for text in FOLLOW_UPS:
                replies.append(s.chat(msgs, max_tokens=8))
                msgs += [{"role": "assistant", "content": replies[-1]}, {"role": "user", "content": text}]
            out[opening] = replies
    return out


def test_affinity_failover_and_cluster_stats(cluster):
    openings = [f"conversation number {i}" for i in range(12)]
    expected = _expected(openings)
    msgs = {o: [{"role": "user", "content": o}] for o in openings}
    got = {o: [] for o in openings}
    where = {o: set() for o in openings}

    def turn(o: str) -> None:
        reply, replica = cluster.chat(msgs[o])
        got[o].append(reply)
        where[o].add(replica)
        msgs[o] += [{"role": "assistant", "content": reply}, {"role": "user", "content": FOLLOW_UPS[len(got[o]) - 1]}]

    with ThreadPoolExecutor(6) as pool:  # two turns each, concurrently: affinity under load
        for _ in range(2):
            list(pool.map(turn, openings))
    assert all(len(w) == 1 for w in where.values()), where
    assert len(set().union(*where.values())) == 2, (where, cluster.replicas())  # 12 keys, 2 replicas

    stats = cluster.get("/stats")
    assert stats["num_replicas"] == 2 and stats["total"]["conversations"] == 12
    assert stats["total"]["requests_served"] == 24 and stats["total"]["store_writes"] == 24
    assert sum(s["conversations"] for s in stats["replicas"].values()) == 12

    victim = next(iter(where[openings[0]]))  # kill the replica that holds conversation 0
    moved = [o for o in openings if where[o] == {victim}]
    in_flight = ThreadPoolExecutor(1).submit(_raw_chat, cluster.url, msgs[moved[0]] + [], 800)
    deadline = time.monotonic() + 60
    while not cluster.get("/stats")["replicas"][victim]["in_flight"]:  # a long reply is being generated on it
        assert time.monotonic() < deadline and not in_flight.done(), "the long request never ran on the victim"
        time.sleep(0.02)
    cluster.kill(victim)
    status, headers, error = in_flight.result(timeout=120)
    assert status == 503 and headers.get("Retry-After") == "1", (status, error)  # retryable: the SDK retries
    assert error["error"]["code"] == "replica_unavailable"
    for _ in range(2):
        for o in openings:
            turn(o)
    assert got == expected  # identical to a single unbounded server, turn by turn
    assert moved and all(len(where[o]) == 2 for o in moved)  # they went on elsewhere
    after = cluster.get("/stats")
    assert victim not in after["replicas"]
    assert after["total"]["shared_restores"] >= len(moved)  # the moved conversations came back from Redis
    health = cluster.get("/health")
    assert health["status"] in ("ok", "degraded") and health["store_up"] is True


def test_bad_session_header_streaming_and_errors_through_the_ingress(cluster):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    req = urllib.request.Request(cluster.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json", "X-Session-Id": "x" * 500})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400
    reply, replica = cluster.chat([{"role": "user", "content": "hi"}], session="s-1")
    stream = cluster.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == reply  # streaming, too
    with pytest.raises(openai.NotFoundError):  # errors are a single server's
        cluster.client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert cluster.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply},
                         {"role": "user", "content": "ok"}], session="s-1")[1] == replica
