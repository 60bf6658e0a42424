"""Continuous batching in ``kvbound serve`` (tiny-llama, the real ``openai`` client on a live port):
batched replies equal each request alone, exact policies equal ``full``, join/leave, failures,
cancellation, streaming, parking; and :func:`kvbound.batching.decode_step` without a server."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from test_serve import MODEL, _play, _script, loaded, serving  # noqa: E402

from kvbound import make_cache  # noqa: E402
from kvbound.batching import batch_refusal, decode_step, padded_rows  # noqa: E402
from kvbound.cli import main  # noqa: E402
from kvbound.errors import KVBoundError  # noqa: E402
from kvbound.generation import prefill  # noqa: E402
from kvbound.serve import ServeConfig  # noqa: E402

PROMPTS = [f"Request {i}: write about the number {3 * i + 1} and {'why ' * i}it matters." for i in range(6)]
EXACT = [("full", None), ("offload", 6)]


def _complete(live, prompt: str, max_tokens: int = 14, **kw) -> str:
    out = live.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens,
                                         temperature=kw.pop("temperature", 0), **kw)
    return out.choices[0].text


def _together(live, prompts, **kw) -> list[str]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda p: _complete(live, p, **kw), prompts))


# --------------------------------------------------------------------------- without a server


@pytest.mark.parametrize("policy,budget", [("full", None), ("offload", 6), ("h2o", 8), ("kivi", None)])
def test_decode_step_rows_equal_each_sequence_alone(policy, budget):
    model, _ = loaded()
    prompts = [torch.arange(5 + 7 * i, 5 + 9 * i + 4)[None] % 200 for i in range(3)]  # ragged: 4, 6, 8 tokens

    def run(groups):
        caches = [make_cache(model, policy, budget) for _ in prompts]
        for c, p in zip(caches, prompts):
            prefill(model, p[:, :-1], c, 3)
        tokens = [int(p[0, -1]) for p in prompts]
        out = [[] for _ in prompts]
        for _ in range(10):
            for group in groups:
                logits = decode_step(model, [caches[i] for i in group], [tokens[i] for i in group])
                for i, row in zip(group, logits):
                    tokens[i] = int(row.argmax())
                    out[i].append(tokens[i])
        return out

    assert batch_refusal(make_cache(model, policy, budget)) is None
    assert run([[0, 1, 2]]) == run([[0], [1], [2]])


def test_padded_rows_and_what_runs_sequentially():
    assert [padded_rows(n) for n in (1, 3, 4, 5, 9, 12, 13)] == [4, 4, 4, 8, 12, 12, 13]
    assert [padded_rows(n, 1) for n in (1, 3, 5)] == [1, 3, 5]
    model, _ = loaded()
    assert "re-runs the model" in batch_refusal(make_cache(model, "kv-direct", 8))
    assert "residuals" in batch_refusal(make_cache(model, "residual", 8)) or "layer input" in batch_refusal(
        make_cache(model, "residual", 8))


# --------------------------------------------------------------------------- replies


def test_batched_replies_equal_each_request_alone_and_exact_equals_full():
    replies = {}
    for policy, budget in EXACT:
        with serving(policy=policy, budget=budget) as live:
            together = _together(live, PROMPTS)
            s = live.stats()
            assert s["batching"]["mode"] == "batched" and s["batching"]["mean_decode_rows"] > 1.5
        with serving(policy=policy, budget=budget) as live:
            alone = [_complete(live, p) for p in PROMPTS]
            assert live.stats()["batching"]["mean_decode_rows"] == 1
        assert together == alone
        replies[policy] = together
    assert replies["offload"] == replies["full"]


def test_join_and_leave_mid_batch():
    with serving(policy="full", max_batch=3) as live:
        alone = [_complete(live, p, max_tokens=n) for p, n in zip(PROMPTS, (30, 4, 12, 6, 20))]
    with serving(policy="full", max_batch=3) as live:
        got: dict[int, str] = {}

        def ask(i: int, n: int) -> None:
            got[i] = _complete(live, PROMPTS[i], max_tokens=n)

        long = live.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0,
                                              stream=True)
        parts, joined = [], []
        for chunk in long:  # others join (and the short ones leave) while request 0 streams
            parts.append(chunk.choices[0].text)
            if len(parts) == 2:
                for i, n in ((1, 4), (2, 12), (3, 6), (4, 20)):
                    joined.append(threading.Thread(target=ask, args=(i, n)))
                    joined[-1].start()
        for t in joined:
            t.join(60)
        s = live.stats()
    assert ["".join(parts)] + [got[i] for i in range(1, 5)] == alone
    assert s["requests_served"] == 5 and 1 < s["batching"]["mean_decode_rows"] <= 3


def test_streaming_and_seeded_sampling_under_batching():
    kw = dict(max_tokens=12, temperature=0.9, top_p=0.9)
    with serving(policy="full") as live:
        alone = [_complete(live, p, seed=11 + i, **kw) for i, p in enumerate(PROMPTS[:4])]

        def streamed(i: int) -> str:
            chunks = live.client.completions.create(model=MODEL, prompt=PROMPTS[i], seed=11 + i, stream=True, **kw)
            return "".join(c.choices[0].text for c in chunks)

        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(streamed, range(4))) == alone
        assert live.stats()["batching"]["mean_decode_rows"] > 1


def test_a_request_failing_inside_a_batched_step_fails_alone():
    with serving(policy="full") as live:
        alone = [_complete(live, p) for p in PROMPTS[:4]]
        worker = live.engine.worker
        take = worker._take

        def failing(slot, logits):
            if slot.job.prompt == live.engine.encode_prompt(PROMPTS[2]) and len(slot.generated) == 3:
                raise RuntimeError("boom")
            return take(slot, logits)

        worker._take = failing

        def ask(p: str):
            try:
                return _complete(live, p)
            except openai.APIStatusError as exc:
                return exc

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, PROMPTS[:4]))
        worker._take = take
        assert isinstance(got[2], openai.InternalServerError) and "boom" in str(got[2])
        assert got[:2] + got[3:] == alone[:2] + alone[3:]
        assert live.stats()["requests_failed"] == 1
        assert _complete(live, PROMPTS[2]) == alone[2]  # the failed conversation was dropped, not corrupted


def test_cancelling_one_stream_leaves_the_others():
    with serving(policy="offload", budget=6) as live:
        alone = [_complete(live, p, max_tokens=20) for p in PROMPTS[:3]]
        done: dict[int, str] = {}

        def ask(i: int) -> None:
            done[i] = _complete(live, PROMPTS[i], max_tokens=20)

        stream = live.client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=400,
                                                temperature=0, stream=True)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for i, _chunk in enumerate(stream):
            if i == 0:
                for t in threads:
                    t.start()
            if i == 4:
                break
        stream.close()
        for t in threads:
            t.join(60)
        deadline = time.monotonic() + 20
        while live.stats()["requests_cancelled"] < 1:
            assert time.monotonic() < deadline, "the worker kept generating for a closed stream"
            time.sleep(0.05)
        assert [done[i] for i in range(3)] == alone
        assert live.stats()["completion_tokens"] < 400 + 60


def test_parking_and_restoring_under_batching():
    script = _script(n_conv=4, turns=3)
    per_conv: dict[int, list] = {}
    for conv, text in script:
        per_conv.setdefault(conv, []).append((conv, text))

    def concurrently(live) -> dict[int, list[str]]:
        with ThreadPoolExecutor(4) as pool:
            return dict(zip(per_conv, pool.map(lambda c: _play(live, per_conv[c]), per_conv)))

    for policy, budget in EXACT:
        with serving(policy=policy, budget=budget) as live:
            hot = {c: _play(live, turns) for c, turns in per_conv.items()}  # one conversation at a time
        with serving(policy=policy, budget=budget, memory_budget=1) as live:
            parked = concurrently(live)
            s = live.stats()
        assert parked == hot
        assert s["restores"] >= 4 and s["parks"] >= 4 and s["batching"]["mean_decode_rows"] > 1


def test_sequential_policies_say_so_and_keep_working():
    with serving(policy="kv-direct", budget=8) as live:
        together = _together(live, PROMPTS[:3])
        s = live.stats()["batching"]
        assert s["mode"] == "sequential" and "re-runs the model" in s["sequential_reason"]
        assert s["mean_decode_rows"] == 1
        assert together == [_complete(live, p) for p in PROMPTS[:3]]


def test_overload_answers_429_with_a_batch_running():
    with serving(policy="full", max_queue=1, max_batch=2) as live:
        results: list = []

        def ask(i: int) -> None:
            try:
                results.append(_complete(live, f"hi {i}", max_tokens=4))
            except openai.APIStatusError as exc:
                results.append(exc)

        with live.engine.worker.lock:  # the worker admits at most max_batch jobs, then waits: one more queues
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 20
            while sum(isinstance(r, Exception) for r in results) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        for t in threads:
            t.join(30)
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(results) == 6 and 3 <= len(refused) <= 5
        assert all(r.status_code == 429 and r.body["code"] == "rate_limit_exceeded" for r in refused)


def test_max_batch_must_be_a_whole_number_of_at_least_one(capsys):
    for bad in (0, -2):
        with pytest.raises(KVBoundError, match="max_batch"):
            ServeConfig(model=MODEL, max_batch=bad)
    assert main(["serve", "--model", MODEL, "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_batch" in err
    assert main(["serve", "--model", MODEL, "--row-group", "0"]) == 2
    assert "row_group" in capsys.readouterr().err
    assert main(["serve", "--model", MODEL, "--interleave-chunk", "-1"]) == 2
    assert "--interleave-chunk must be >= 0" in capsys.readouterr().err
    with pytest.raises(KVBoundError, match="interleave_chunk"):
        ServeConfig(model=MODEL, interleave_chunk=0)


@pytest.mark.parametrize("policy, budget, options", [("expected-attention", 8, {}), ("kvzip", 8, {}),
                                                     ("think", None, {}), ("snapkv", 8, {"think": 0.5})])
def test_policies_that_observe_the_attention_input_or_the_output_run_sequentially(policy, budget, options):
    model, _ = loaded()
    reason = batch_refusal(make_cache(model, policy, budget, **options))
    assert reason is not None and "one sequence per pass" in reason


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
@pytest.mark.parametrize("policy,budget", [("full", None), ("offload", 6), ("snapkv", 8)])
def test_packed_prompt_chunks_and_decode_rows_equal_each_alone(family, policy, budget):
    """One pass mixing prompt chunks and decode rows: every segment as when it runs alone in a pass,
    and (within float rounding) as the ordinary chunked prefill and decode."""
    from kvbound.batching import packed_step
    from kvbound.tiny import build_tiny

    model = build_tiny(family)
    prompts = [(torch.arange(11 + 9 * i) * (i + 3) % 200).tolist() for i in range(3)]  # 11, 20, 29 tokens

    def run(together: bool) -> list[torch.Tensor]:
        caches = [make_cache(model, policy, budget) for _ in prompts]
        pending = {i: 0 for i in range(len(prompts))}  # tokens fed
        nxt: dict[int, int] = {}
        logits: list[list[torch.Tensor]] = [[] for _ in prompts]
        for _ in range(12):
            segs = []
            for i, p in enumerate(prompts):
                if i in nxt:
                    segs.append((i, [nxt[i]]))
                else:
                    segs.append((i, p[pending[i]:pending[i] + 8]))  # 8-token prompt chunks
            groups = [segs] if together else [[s] for s in segs]
            for group in groups:
                out = packed_step(model, [caches[i] for i, _ in group], [seg for _, seg in group])
                for (i, seg), row in zip(group, out):
                    if i not in nxt:
                        pending[i] += len(seg)
                        if pending[i] < len(prompts[i]):
                            continue
                    logits[i].append(row)
                    nxt[i] = int(row.argmax())
        return logits

    together, alone = run(True), run(False)
    assert [len(x) for x in together] == [len(x) for x in alone] and min(len(x) for x in alone) >= 8
    for a, b in zip(together, alone):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    for i, p in enumerate(prompts):  # the ordinary path: the model on the same prompt chunks
        cache = make_cache(model, policy, budget)
        with torch.no_grad():
            for a in range(0, len(p), 8):
                ref = model(input_ids=torch.tensor([p[a:a + 8]]), attention_mask=torch.ones(1, min(len(p), a + 8)),
                            past_key_values=cache, use_cache=True).logits[0, -1]
        torch.testing.assert_close(ref, alone[i][0], atol=1e-4, rtol=1e-4)


def test_query_blocks_cut_at_multiples_of_the_block():
    from kvbound.batching import query_blocks

    assert query_blocks(0, 40, 16) == [(0, 16), (16, 32), (32, 40)]
    assert query_blocks(10, 30, 16) == [(0, 6), (6, 22), (22, 30)]  # positions 10..15, 16..31, 32..39
    assert query_blocks(32, 16, 16) == [(0, 16)] and query_blocks(5, 1, 16) == [(0, 1)]


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_a_prompt_fed_whole_or_in_pieces_beside_decode_rows_computes_the_same_bits(family):
    """With query_block N, a prompt's plain-K/V segment attends in query blocks cut at multiples of N: fed
    whole alone, or in pieces ending at multiples of N beside other conversations' decode rows, its K/V
    and its last logits are bit-identical (the server's --interleave-chunk relies on it)."""
    from kvbound.batching import packed_step
    from kvbound.tiny import build_tiny

    model = build_tiny(family)
    n, block = 8, 8
    for length, before in ((45, 0), (37, 11)):  # a fresh prompt; a new turn after 11 held tokens
        prompt = (torch.arange(length + before) * 7 % 200).tolist()
        whole, pieces = make_cache(model, "full"), make_cache(model, "full")
        others = [make_cache(model, "full") for _ in range(5)]
        for i, o in enumerate(others):
            packed_step(model, [o], [list(range(3 + i, 20 + i))], query_block=block)
        if before:
            for c in (whole, pieces):
                packed_step(model, [c], [prompt[:before]], query_block=block)
        last_whole = packed_step(model, [whole], [prompt[before:]], query_block=block)[0]
        seen = before
        while seen < len(prompt):
            end = min(len(prompt), (seen // n + 1) * n)
            last_pieces = packed_step(model, [pieces, *others], [prompt[seen:end]] + [[9]] * 5, query_block=block)[0]
            seen = end
        assert torch.equal(last_whole, last_pieces)
        for a, b in zip(whole.layers, pieces.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_a_new_prompt_goes_in_small_pieces_while_others_decode():
    """--interleave-chunk: while a reply streams, a new prompt is prefilled in pieces of at most N tokens (more
    prefill passes than with whole chunks), and its reply equals the request alone."""
    prompt = "Tell me everything about the number seven and the number eight, slowly and at length."
    with serving(policy="full") as live:
        alone = _complete(live, prompt, max_tokens=6)
    counts, replies = {}, {}
    for chunk in (8, None):
        with serving(policy="full", interleave_chunk=chunk) as live:
            stream = live.client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=40, temperature=0,
                                                    stream=True)
            parts = []
            for part in stream:
                parts.append(part.choices[0].text)
                if len(parts) == 2:
                    before = live.stats()["prefill_passes"]
                    replies[chunk] = _complete(live, prompt, max_tokens=6)
                    counts[chunk] = live.stats()["prefill_passes"] - before
    tokens = len(prompt.encode())  # tiny-llama's byte tokenizer
    assert counts[None] <= 2 and counts[8] >= tokens // 8
    assert replies[8] == replies[None] == alone
