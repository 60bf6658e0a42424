"""The shared parking store: a real redis-server, a single kvbound server (restart, outage, bad entries)."""

from __future__ import annotations

import json
import urllib.request
from array import array

import pytest

pytest.importorskip("redis")
pytest.importorskip("fastapi")

from kvbound.cli import main  # noqa: E402
from kvbound.errors import KVBoundError  # noqa: E402
from kvbound.serve.affinity import affinity  # noqa: E402
from kvbound.serve.redis_store import RedisParking, decode_entry, encode_entry  # noqa: E402
from kvbound.serve.schemas import APIError  # noqa: E402

from redis_fixture import free_port, redis_server  # noqa: E402
from test_serve import _post, serving  # noqa: E402

TURNS = ["Hello there, who are you?", "Tell me more.", "And then?"]


def _conversation(live, turns=TURNS, history=None, **kw) -> tuple[list[str], list[dict]]:
    msgs = list(history or [{"role": "system", "content": "You are terse."}])
    replies = []
    for text in turns:
        msgs.append({"role": "user", "content": text})
        reply = live.chat(msgs, max_tokens=8, **kw)
        replies.append(reply)
        msgs.append({"role": "assistant", "content": reply})
    return replies, msgs


@pytest.fixture(scope="module")
def unbounded():
    with serving() as s:
        yield s


# --------------------------------------------------------------------------- keys and entries
def test_affinity_keys_follow_header_then_user_then_first_turns():
    first = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]}
    later = {"messages": first["messages"] + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q2"}]}
    other = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q9"}]}
    assert affinity(first) == affinity(later) != affinity(other)
    assert affinity(first, {"X-Session-Id": "abc"}).route == affinity(other, {"x-session-id": "abc"}).route == "s:abc"
    u1, u2 = affinity({**first, "user": "ann"}), affinity({**other, "user": "ann"})
    assert u1.route == u2.route and u1.conversation != u2.conversation  # one user, two conversations
    assert affinity({**first, "user": "bob"}).conversation != u1.conversation
    text = {"prompt": "x" * 300}
    assert affinity(text) == affinity({"prompt": "x" * 300 + " more"})
    for bad in ["x" * 129, "", "caf\u00e9", "a\x00b", b"\xff\xfe"]:
        with pytest.raises(APIError) as err:
            affinity(first, {"X-Session-Id": bad})
        assert err.value.status == 400


def test_entries_refuse_another_model_and_corruption():
    ids = array("i", [5, 7, 11, 250])
    raw = encode_entry("tiny-llama", ids)
    assert decode_entry(raw, "tiny-llama", 256) == ids
    with pytest.raises(KVBoundError, match="model 'tiny-llama', not 'other'"):
        decode_entry(raw, "other")
    for broken in [raw[:-1], raw[:-4] + b"\x01\x00\x00\x00", b"junk" + raw[4:], raw[:6]]:
        with pytest.raises(KVBoundError):
            decode_entry(broken, "tiny-llama", 256)
    with pytest.raises(KVBoundError, match="outside"):
        decode_entry(encode_entry("tiny-llama", array("i", [1, 300])), "tiny-llama", 256)


# --------------------------------------------------------------------------- a single server
def test_a_restarted_server_restores_its_conversations_from_redis(tmp_path, unbounded):
    expected, _ = _conversation(unbounded)
    with redis_server(tmp_path) as url:
        with serving(store=url) as s:
            first, msgs = _conversation(s, TURNS[:2])
            assert s.stats()["store_writes"] == 2
        with serving(store=url) as s:  # a new process' store: nothing hot, the entry is in Redis
            last, _ = _conversation(s, TURNS[2:], history=msgs)
            stats = s.stats()
    assert first + last == expected
    assert stats["shared_restores"] == 1 and stats["restores"] == 1 and stats["store_hits"] == 1


def test_a_redis_entry_for_another_model_or_corrupt_is_refused(tmp_path, unbounded):
    expected, _ = _conversation(unbounded)
    with redis_server(tmp_path) as url:
        with serving(store=url) as s:
            _, msgs = _conversation(s, TURNS[:2])
        body = {"model": "tiny-llama", "messages": msgs}
        key = RedisParking(url, "tiny-llama").key(affinity(body).conversation)
        store = RedisParking.connect(url, "tiny-llama")
        good = store.client.get(key)
        for bad in [encode_entry("smollm2-135m", array("i", range(40))), good[:-3]]:
            store.client.set(key, bad)
            with serving(store=url) as s:
                last, _ = _conversation(s, TURNS[2:], history=msgs)
                stats = s.stats()
            assert last == expected[2:]
            assert stats["store_refused"] == 1 and stats["shared_restores"] == 0
        store.close()


def test_redis_down_hot_conversations_keep_serving_and_health_says_so(tmp_path, unbounded):
    expected, _ = _conversation(unbounded)
    with redis_server(tmp_path) as url:
        with serving(store=url) as s:
            first, msgs = _conversation(s, TURNS[:1])
            assert json.load(urllib.request.urlopen(s.url + "/health"))["store_up"] is True
            redis_proc_stop(url)  # Redis goes away while the server runs
            rest, _ = _conversation(s, TURNS[1:], history=msgs)
            health = json.load(urllib.request.urlopen(s.url + "/health"))
            stats = s.stats()
    assert first + rest == expected
    assert health["status"] == "degraded" and health["store_up"] is False
    assert stats["store_up"] is False and stats["store_errors"] >= 1 and stats["requests_failed"] == 0


def redis_proc_stop(url: str) -> None:
    """Shut the Redis server down from a client (the fixture's terminate then finds it gone)."""
    import redis

    try:
        redis.Redis.from_url(url).shutdown(nosave=True)
    except (redis.ConnectionError, redis.ResponseError):
        pass


def test_session_id_header_too_long_or_binary_is_a_400(unbounded):
    body = json.dumps({"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    for value in ["x" * 200, "\u00ff\u00fe"]:
        req = urllib.request.Request(unbounded.url + "/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json",
                                              "X-Session-Id": value.encode("latin-1").decode("latin-1")})
        try:
            urllib.request.urlopen(req)
            raise AssertionError("accepted")
        except urllib.error.HTTPError as err:
            assert err.code == 400
            assert json.load(err)["error"]["code"] == "invalid_session_id"
    status, _ = _post(unbounded.url + "/v1/chat/completions", body.encode())
    assert status == 200


def test_cli_refuses_replicas_0_and_unreachable_redis(capsys):
    assert main(["serve", "--model", "tiny-llama", "--store", f"redis://127.0.0.1:{free_port()}/0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "cannot reach the Redis store" in err and len(err.splitlines()) == 1
    pytest.importorskip("ray")
    assert main(["serve", "--model", "tiny-llama", "--replicas", "0"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--replicas must be a whole number >= 1, got 0" in err and len(err.splitlines()) == 1
