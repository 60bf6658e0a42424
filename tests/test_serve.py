"""kvbound serve: the real ``openai`` client against a live uvicorn server (tiny-llama; SmolLM2 once)."""

from __future__ import annotations

import contextlib
import functools
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from kvbound import make_cache  # noqa: E402
from kvbound.cli import main  # noqa: E402
from kvbound.errors import KVBoundError  # noqa: E402
from kvbound.generation import greedy  # noqa: E402
from kvbound.serve import ServeConfig, create_app, parse_size  # noqa: E402
from kvbound.serve.radix import RadixTree, common_prefix  # noqa: E402

MODEL = "tiny-llama"


@functools.lru_cache(maxsize=None)
def loaded(name: str = MODEL):
    from kvbound.models import load

    return load(name)


class Live:
    """A running server: its base URL, engine, and an ``openai`` client."""

    def __init__(self, url: str, engine) -> None:
        self.url, self.engine = url, engine
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

    def stats(self) -> dict:
        with urllib.request.urlopen(self.url + "/stats") as r:
            return json.load(r)

    def chat(self, messages, max_tokens: int = 10, **kw) -> str:
        out = self.client.chat.completions.create(model=self.engine.name, messages=messages, max_tokens=max_tokens,
                                                  temperature=kw.pop("temperature", 0), **kw)
        return out.choices[0].message.content


@contextlib.contextmanager
def serving(model_name: str = MODEL, **options):
    """Start a uvicorn server for ``model_name`` on a free port in a thread; stop it afterwards."""
    model, tok = loaded(model_name)
    app = create_app(ServeConfig(model=model_name, **options), model=model, tokenizer=tok)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield Live(f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.engine)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def reference(model_name: str, ids: list[int], n: int) -> list[int]:
    """Greedy tokens from a fresh full cache: what a stateless server must answer."""
    model, _ = loaded(model_name)
    out = greedy(model, torch.tensor([ids]), make_cache(model, "full"), n)
    return out[0].tolist()


def chat_ids(messages) -> list[int]:
    return loaded()[1].apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def decode(ids) -> str:
    return loaded()[1].decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def live():
    with serving(policy="kv-direct", budget=8) as s:
        yield s


# --------------------------------------------------------------------------- endpoints


def test_models_health_and_greedy_chat_match_a_fresh_full_cache(live):
    assert [m.id for m in live.client.models.list().data] == [MODEL]
    with urllib.request.urlopen(live.url + "/health") as r:
        assert json.load(r) == {"status": "ok"}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    out = live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    ids = chat_ids(messages)
    want = reference(MODEL, ids, 12)
    assert out.choices[0].message.content == decode(want)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(want)
    assert out.choices[0].finish_reason == ("stop" if len(want) < 12 else "length")


def test_streaming_chat_and_completions_equal_the_whole_reply(live):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    whole = live.chat(messages, max_tokens=20)
    chunks = list(live.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                      stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert chunks[-1].usage.completion_tokens >= 1 and not chunks[-1].choices

    prompt = "The quick brown fox"
    done = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0)
    assert done.choices[0].text == decode(reference(MODEL, loaded()[1](prompt)["input_ids"], 15))
    streamed = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=15, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text


def test_stop_strings_cut_the_reply(live):
    prompt = "The quick brown fox"
    full = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0).choices[0].text
    stop = full[5:8]
    cut = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=stop)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[:full.find(stop)]
    streamed = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=0, stop=[stop],
                                              stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_is_reproducible(live):
    messages = [{"role": "user", "content": "Say something random."}]
    kw = dict(max_tokens=16, temperature=0.9, top_p=0.9)
    a = live.chat(messages, seed=7, **kw)
    assert live.chat(messages, seed=7, **kw) == a
    others = {live.chat(messages, seed=s, **kw) for s in (1, 2, 3)}
    assert others - {a}, "different seeds never changed the sample"


# --------------------------------------------------------------------------- conversations and parking


def _script(n_conv: int = 3, turns: int = 3) -> list[tuple[int, str]]:
    """Interleaved user turns of several conversations (conversation index, text)."""
    order = [(c, f"turn {t} of chat {c}: tell me more about number {7 * c + t}.") for t in range(turns) for c in range(n_conv)]
    random.Random(0).shuffle(order)
    order.sort(key=lambda x: int(x[1].split()[1]))  # keep each conversation's turns in order
    return order


def _play(live: Live, script, max_tokens: int = 12) -> list[str]:
    history: dict[int, list[dict]] = {}
    replies = []
    for conv, text in script:
        msgs = history.setdefault(conv, [{"role": "system", "content": f"You are bot {conv}."}])
        msgs.append({"role": "user", "content": text})
        reply = live.chat(msgs, max_tokens=max_tokens)
        msgs.append({"role": "assistant", "content": reply})
        replies.append(reply)
    return replies


@pytest.mark.parametrize("policy,budget", [("full", None), ("kv-direct", 8)])
def test_parked_conversations_restore_to_identical_replies(policy, budget):
    script = _script()
    with serving(policy=policy, budget=budget) as hot:
        unbounded = _play(hot, script)
        s = hot.stats()
        assert s["parked"] == 0 and s["hot"] == 3 and s["conversations"] == 3
        assert s["prefix_hits"] == 6 and s["reused_tokens"] > 0  # every later turn continued its conversation
    with serving(policy=policy, budget=budget, memory_budget=1) as tight:  # everything idle is parked
        parked = _play(tight, script)
        s = tight.stats()
    assert parked == unbounded
    assert s["restores"] == 6 and s["parks"] == 9 and s["hot"] == 0 and s["parked"] == 3
    assert s["hot_kv_bytes"] == 0 and s["parked_bytes"] == 4 * s["parked_tokens"] > 0
    # and every reply is what a fresh full cache gives for that request's tokens
    history: dict[int, list[dict]] = {}
    for (conv, text), reply in zip(script, parked):
        msgs = history.setdefault(conv, [{"role": "system", "content": f"You are bot {conv}."}])
        msgs.append({"role": "user", "content": text})
        assert reply == decode(reference(MODEL, chat_ids(msgs), 12))
        msgs.append({"role": "assistant", "content": reply})


def test_parking_an_offload_conversation_deletes_its_files(tmp_path):
    script = _script(n_conv=2, turns=2)
    with serving(policy="offload", budget=4) as hot:
        unbounded = _play(hot, script)
    with serving(policy="offload", budget=4, options={"dir": str(tmp_path)}, memory_budget=1) as tight:
        assert _play(tight, script) == unbounded
        assert list(tmp_path.iterdir()) == []  # every idle conversation parked: its offload files are gone
        assert tight.stats()["restores"] == 2


def test_a_lossy_policy_continues_without_rollback():
    with serving(policy="window", budget=8) as live:
        msgs = [{"role": "user", "content": "first question"}]
        msgs += [{"role": "assistant", "content": live.chat(msgs)}, {"role": "user", "content": "second"}]
        assert live.chat(msgs)
        s = live.stats()
    assert s["conversations"] == 1 and s["prefix_hits"] == 1


def test_memory_budget_keeps_the_most_recent_conversations_hot():
    model, _ = loaded()
    per_conv = make_cache(model, "full").kv_bytes_per_token * 60  # a conversation here holds ~60 tokens
    with serving(policy="full", memory_budget=2 * per_conv) as live:
        _play(live, _script(n_conv=4, turns=1))
        s = live.stats()
    assert s["hot"] in (1, 2) and s["parked"] == 4 - s["hot"]
    assert 0 < s["held_bytes"] <= 2 * per_conv and s["hot_kv_bytes"] == s["held_bytes"]


# --------------------------------------------------------------------------- concurrency


def test_concurrent_clients_get_the_sequential_replies(live):
    def conversation(i: int) -> list[str]:
        msgs = [{"role": "user", "content": f"client {i} says hello"}]
        first = live.chat(msgs, max_tokens=8)
        msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "and then?"}]
        return [first, live.chat(msgs, max_tokens=8)]

    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(conversation, range(6)))
    assert together == [conversation(i) for i in range(6)]


def test_full_queue_answers_429_and_the_server_keeps_serving():
    # max_batch=1: the worker admits exactly one job before it waits for the lock (with a larger batch it
    # may take several of the racing requests off the queue first, and fewer than 2 would be refused)
    with serving(policy="full", max_queue=1, max_batch=1) as live:
        results: list = []

        def ask(i: int) -> None:
            try:
                results.append(live.chat([{"role": "user", "content": f"hi {i}"}], max_tokens=4))
            except openai.APIStatusError as exc:
                results.append(exc)

        with live.engine.worker.lock:  # the worker takes one job and waits: one more fits the queue
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while sum(isinstance(r, Exception) for r in results) < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
        for t in threads:
            t.join(30)
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(results) == 4 and 2 <= len(refused) <= 3
        assert all(r.status_code == 429 and r.body["code"] == "rate_limit_exceeded" for r in refused)
        assert live.chat([{"role": "user", "content": "still there?"}], max_tokens=4) is not None


def test_client_disconnect_mid_stream_stops_generation():
    with serving(policy="full") as live:
        stream = live.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=900,
                                                temperature=0, stream=True)
        for i, _chunk in enumerate(stream):
            if i == 3:
                break
        stream.close()
        deadline = time.monotonic() + 20
        while live.stats()["requests_cancelled"] < 1:
            assert time.monotonic() < deadline, "the worker kept generating for a closed stream"
            time.sleep(0.05)
        s = live.stats()
        assert s["completion_tokens"] < 900 and s["requests_served"] == 0
        assert live.chat([{"role": "user", "content": "next"}], max_tokens=4) is not None


# --------------------------------------------------------------------------- bad input


def _post(url: str, raw: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


BAD = [
    ("chat", b'{"model": "tiny-llama", "messages": [', 400),
    ("chat", b'["not", "an", "object"]', 400),
    ("chat", {"model": MODEL}, 400),
    ("chat", {"model": MODEL, "messages": []}, 400),
    ("chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("chat", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, 400),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x" * 1100}]}, 400),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400),
    ("completions", {"model": MODEL, "prompt": ""}, 400),
    ("completions", {"model": MODEL, "prompt": [1, 2, 999]}, 400),
    ("completions", {"model": MODEL, "prompt": "y" * 1024}, 400),
]


@pytest.mark.parametrize("endpoint,body,status", BAD)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(live, endpoint, body, status):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, payload = _post(f"{live.url}/v1/{endpoint.replace('chat', 'chat/completions')}", raw)
    assert got == status
    assert set(payload) == {"error"} and set(payload["error"]) >= {"message", "type", "code"}
    assert payload["error"]["message"] and "\n" not in payload["error"]["message"]
    assert live.chat([{"role": "user", "content": "ok?"}], max_tokens=2) is not None


def test_openai_client_sees_typed_errors(live):
    with pytest.raises(openai.NotFoundError):
        live.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="positions"):
        live.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4000)


# --------------------------------------------------------------------------- pieces


def test_radix_tree_finds_every_stored_prefix():
    rng = random.Random(0)
    tree, keys = RadixTree(), {}
    for i in range(200):
        base = list(keys.values())[rng.randrange(len(keys))] if keys and rng.random() < 0.6 else []
        key = base[: rng.randrange(len(base) + 1)] + [rng.randrange(4) for _ in range(rng.randrange(1, 6))]
        keys[i] = key
        node = tree.insert(key, i)
        assert list(node.tokens()) == key
        if rng.random() < 0.3:  # remove a random key
            j = rng.choice(list(keys))
            tree.remove(tree.insert(keys[j], j), j)
            del keys[j]
        query = key + [rng.randrange(4) for _ in range(3)]
        found = {v for node, depth in tree.prefixes(query) for v in node.keys}
        assert found == {k for k, v in keys.items() if query[:len(v)] == v}
    assert tree.token_bytes() <= 4 * sum(len(v) for v in keys.values())
    assert common_prefix([1, 2, 3, 4], [1, 2, 9]) == 2 and common_prefix([], [1]) == 0


def test_parked_and_dropped_caches_are_freed_without_the_garbage_collector():
    import gc
    import weakref

    from kvbound.serve.store import ConversationStore

    model, _ = loaded()
    store = ConversationStore(lambda: make_cache(model, "kv-direct", 4), memory_budget=0, max_conversations=1)
    gc.disable()
    try:
        refs = []
        for i in range(2):
            prompt = [10 + i] * 12
            lease = store.checkout(prompt)
            refs.append(weakref.ref(lease.conversation.cache))
            reply = greedy(model, torch.tensor([prompt]), lease.conversation.cache, 3, stop_at_eos=False)[0].tolist()
            store.checkin(lease.conversation, prompt, reply)
            assert refs[-1]() is None  # parked: memory_budget 0
        s = store.stats()
        assert s["conversations"] == 1 and s["parked"] == 1 and s["dropped"] == 1 and s["parks"] == 2
        assert s["parked_bytes"] == 4 * 15
    finally:
        gc.enable()


def test_parse_size():
    assert parse_size("64MiB") == 64 * 2**20 and parse_size("1GB") == 10**9 and parse_size("1000") == 1000
    assert parse_size("1.5 KiB") == 1536
    for bad in ("12XB", "-1", "lots", ""):
        with pytest.raises(KVBoundError):
            parse_size(bad)


def test_cli_serve_refuses_bad_arguments(capsys):
    assert main(["serve", "--model", MODEL, "--memory-budget", "12XB"]) == 2
    assert "memory size" in capsys.readouterr().err
    assert main(["serve", "--model", MODEL, "--policy", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown policy" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--model", MODEL, "--port", str(taken.getsockname()[1])]) == 2
    assert "cannot listen on" in capsys.readouterr().err


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
@pytest.mark.long  # ~10 s on a quiet 2-core box (model load + two short turns), minutes when it is busy
def test_smollm2_chat_with_parking_matches_a_fresh_full_cache():
    name = "smollm2-135m"
    model, tok = loaded(name)
    with serving(name, policy="full", memory_budget=1) as live:
        live.client = live.client.with_options(timeout=300)  # a busy 2-core box
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        first = live.chat(msgs, max_tokens=8)
        msgs += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
        second = live.chat(msgs, max_tokens=8)
        s = live.stats()
    assert s["restores"] == 1 and s["parked"] == 1
    for reply, upto in ((first, 1), (second, 3)):
        ids = tok.apply_chat_template(msgs[:upto], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        assert reply == tok.decode(reference(name, ids, 8), skip_special_tokens=True)
