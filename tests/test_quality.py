"""kvbound.quality: perplexity through a cache, RULER-style needle tasks, the offline corpus, the
``kvbound perplexity`` command and the ``perplexity``/``needle`` bench scenarios (tiny models; one
short SmolLM2 test marked slow, longer ones long)."""

from __future__ import annotations

import argparse
import functools
import json
import math

import pytest
import torch

import kvbound
from kvbound import cli
from kvbound.bench import cli as bench_cli
from kvbound.cache.registry import exact_policies
from kvbound.errors import KVBoundError
from kvbound.quality import DEFAULT_CHUNK, needle, perplexity

from conftest import prompt_ids, real_model, tiny
from test_kv_direct import one_thread  # noqa: F401 -- autouse: one thread for tiny models


@functools.lru_cache(maxsize=None)
def _loaded(name: str = "tiny-llama"):
    from kvbound.models import load

    return load(name)


@torch.no_grad()
def _plain_nll(model, ids: torch.Tensor) -> float:
    """Mean next-token cross-entropy of one plain forward pass (no cache object)."""
    logits = model(input_ids=ids).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("chunk", [1, 5, DEFAULT_CHUNK, 200])
def test_full_equals_hand_computed_cross_entropy(chunk):
    model = tiny("tiny-llama")
    ids = prompt_ids(48)
    got = perplexity(model, ids, kvbound.make_cache(model, "full"), chunk=chunk)
    nll = _plain_nll(model, ids)
    assert got.tokens == 47 and got.chunk == chunk
    assert got.mean_nll == pytest.approx(nll, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert got.seconds > 0 and got.peak_rss_bytes > 10 * 2**20


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_exact_policies_equal_full_within_a_tenth_of_a_percent(name):
    model = tiny(name)
    ids = prompt_ids(40, seed=3)
    ref = perplexity(model, ids, kvbound.make_cache(model, "full"), chunk=4).perplexity
    window = perplexity(model, ids, kvbound.make_cache(model, "window", 6), chunk=4).perplexity
    assert abs(window / ref - 1) > 1e-3  # the budget really evicts: a lossy policy differs
    for policy in exact_policies():
        for budget in ([None] if policy == "full" else [3, 6]):
            cache = kvbound.make_cache(model, policy, budget)
            try:
                got = perplexity(model, ids, cache, chunk=4).perplexity
            finally:
                cache.close()
            assert got == pytest.approx(ref, rel=1e-3), (policy, budget)


@torch.no_grad()
def _window_reference(model, ids: torch.Tensor, budget: int, chunk: int) -> float:
    """What chunked scoring through ``window`` means, as one plain forward with a custom mask: the
    token at offset ``j`` of a chunk starting at ``pos`` attends to the ``min(pos, budget)`` tokens
    held before the chunk and the chunk's first ``j + 1`` tokens. (A forward on the truncated slice
    would not do: the held tokens' K/V at deeper layers were computed when they saw older tokens.)"""
    total = ids.shape[1]
    i, j = torch.arange(total)[:, None], torch.arange(total)[None]
    pos = i - i % chunk
    allowed = (j <= i) & (j >= pos - torch.clamp(pos, max=budget))
    mask = torch.zeros(total, total).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
    logits = model(input_ids=ids, attention_mask=mask).logits[0].float()
    return torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()


@pytest.mark.parametrize("chunk", [1, 4])
def test_chunk_semantics_for_a_lossy_policy(chunk):
    model = tiny("tiny-llama")
    ids, budget = prompt_ids(40, seed=5), 6
    got = perplexity(model, ids, kvbound.make_cache(model, "window", budget), chunk=chunk)
    assert got.mean_nll == pytest.approx(_window_reference(model, ids, budget, chunk), rel=1e-4)


def test_strict_and_chunked_differ_only_for_lossy_policies():
    model = tiny("tiny-llama")
    ids = prompt_ids(40, seed=7)
    strict = {p: perplexity(model, ids, kvbound.make_cache(model, p, b), chunk=1).perplexity
              for p, b in [("full", None), ("kv-direct", 5), ("window", 5)]}
    chunked = {p: perplexity(model, ids, kvbound.make_cache(model, p, b), chunk=8).perplexity
               for p, b in [("full", None), ("kv-direct", 5), ("window", 5)]}
    assert chunked["full"] == pytest.approx(strict["full"], rel=1e-5)
    assert chunked["kv-direct"] == pytest.approx(strict["kv-direct"], rel=1e-5)
    assert chunked["window"] != pytest.approx(strict["window"], rel=1e-3)


@pytest.mark.parametrize("ids, chunk, message", [
    (torch.tensor([[5]]), 4, "at least 2 tokens"),
    (prompt_ids(10), 0, ">= 1"),
    (prompt_ids(10), -3, ">= 1"),
    (prompt_ids(10), None, ">= 1"),
    (prompt_ids(1100), 4, "at most 1024 positions"),
    (prompt_ids(10, batch=2), 4, "one sequence"),
    (torch.rand(1, 10), 4, "integer token ids"),
])
def test_perplexity_bad_inputs(ids, chunk, message):
    model = tiny("tiny-llama")
    with pytest.raises(KVBoundError, match=message):
        perplexity(model, ids, kvbound.make_cache(model, "full"), chunk=chunk)


def test_perplexity_refuses_a_used_cache():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "full")
    perplexity(model, prompt_ids(10), cache, chunk=4)
    with pytest.raises(KVBoundError, match="fresh cache"):
        perplexity(model, prompt_ids(10), cache, chunk=4)


# --------------------------------------------------------------------------- needle tasks


@pytest.mark.parametrize("kind", needle.KINDS)
def test_needle_task_construction(kind):
    _, tok = _loaded()
    tasks = {d: needle.make_task(tok, 800, d, kind) for d in (0.0, 0.5, 1.0)}
    for depth, task in tasks.items():
        assert 800 - 40 <= task.tokens <= 800
        text = tok.decode(task.input_ids[0].tolist())
        planted = needle.NEEDLE.format(key=task.key, value=task.value)
        assert text.count(planted) == 1 and text.count(task.value) == 1
        assert needle.QUESTION.format(key=task.key).strip() in text
        body = text[text.index(needle.HEADER) + len(needle.HEADER):text.index("What is the special")]
        first, last = body.index(needle.NOISE[0]), body.rindex(needle.NOISE[-1])
        at = body.index(planted)
        if depth == 0.0:
            assert at < first
        elif depth == 1.0:
            assert at > last
        else:
            assert 0.35 < at / len(body) < 0.65
        if kind == "multikey":
            assert len(task.distractors) == 3 and task.key not in {k for k, _ in task.distractors}
            for key, value in task.distractors:
                assert needle.NEEDLE.format(key=key, value=value) in text
        else:
            assert task.distractors == ()
    again = needle.make_task(tok, 800, 0.5, kind)
    assert torch.equal(again.input_ids, tasks[0.5].input_ids) and again.value == tasks[0.5].value
    assert len({t.value for t in tasks.values()}) == 3  # every cell gets its own needle


def test_needle_scoring():
    _, tok = _loaded()
    task = needle.make_task(tok, 700, 0.5)
    assert needle.found(task, f" {task.value}.")
    assert needle.found(task, f" {task.value[:3]} {task.value[3:]}")  # digits split by spaces still count
    assert not needle.found(task, f" {task.value[:-1]}")
    assert not needle.found(task, "I do not know")


@pytest.mark.parametrize("kwargs, message", [
    (dict(length=700, depth=1.5), "depth must be in"),
    (dict(length=700, depth=0.5, kind="haystack"), "unknown needle task"),
    (dict(length=100, depth=0.5), "too short"),
    (dict(length=0, depth=0.5), ">= 1"),
    (dict(length=900, depth=0.5, kind="multikey", keys=1), "keys >= 2"),
])
def test_needle_bad_arguments(kwargs, message):
    _, tok = _loaded()
    with pytest.raises(KVBoundError, match=message):
        needle.make_task(tok, **kwargs)


def test_needle_exact_policies_answer_like_full():
    model, tok = _loaded()
    task = needle.make_task(tok, 640, 0.5, "multikey")
    ref = needle.run_task(model, tok, task, kvbound.make_cache(model, "full"), prefill_chunk=128)
    assert ref.answer and ref.seconds > 0
    for policy in exact_policies():
        cache = kvbound.make_cache(model, policy, None if policy == "full" else 48)
        try:
            got = needle.run_task(model, tok, task, cache, prefill_chunk=128)
        finally:
            cache.close()
        assert (got.answer, got.found) == (ref.answer, ref.found), policy


# --------------------------------------------------------------------------- corpus


def test_offline_corpus_is_long_public_domain_prose():
    from kvbound.quality import corpus

    text = corpus.book_text()
    assert corpus.DEFAULT_BOOK == "Acts" and text.startswith("The former treatise have I made, O Theophilus")
    assert len(text) > 100_000 and text.count("\n\n") == 27  # 28 chapters
    assert corpus.books()[0] == "Genesis" and len(corpus.books()) == 66
    with pytest.raises(KVBoundError, match="unknown book"):
        corpus.book_text("Hezekiah")


# --------------------------------------------------------------------------- CLI


def _run(capsys, *argv):
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_perplexity_cli_json(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times. " * 4)
    code, out, err = _run(capsys, "perplexity", "--model", "tiny-llama", "--text-file", str(text), "--policy", "window",
                          "--budget", "16", "--max-tokens", "150", "--chunk", "8", "--json")
    assert code == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert {"perplexity", "tokens", "mean_nll", "seconds", "peak_rss_bytes", "model", "policy", "budget"} <= set(got)
    assert (got["model"], got["policy"], got["budget"], got["tokens"], got["chunk"]) == ("tiny-llama", "window", 16, 149, 8)
    model, tok = _loaded()
    ids = tok(text.read_text(), return_tensors="pt")["input_ids"][:, :150]
    want = perplexity(model, ids, kvbound.make_cache(model, "window", 16), chunk=8)
    assert got["perplexity"] == pytest.approx(want.perplexity, rel=1e-6)
    assert got["mean_nll"] == pytest.approx(math.log(got["perplexity"]), rel=1e-9)


def _bad_files(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "bin.dat").write_bytes(b"\x7fELF\x00\x01\x02" * 50)
    (tmp_path / "one.txt").write_text("a")
    (tmp_path / "ok.txt").write_text("hello world, a short text")
    (tmp_path / "long.txt").write_text("x" * 1100)
    return tmp_path


@pytest.mark.parametrize("name, extra, message", [
    ("empty.txt", [], "is empty"),
    ("bin.dat", [], "looks binary"),
    ("one.txt", [], "needs at least 2"),
    ("missing.txt", [], "does not exist"),
    ("ok.txt", ["--max-tokens", "5000"], "beyond model 'tiny-llama''s 1024 positions"),
    ("long.txt", [], "--max-tokens 1024 or less"),
    ("ok.txt", ["--max-tokens", "1"], "--max-tokens must be >= 2"),
    ("ok.txt", ["--chunk", "0"], "--chunk must be >= 1"),
    ("ok.txt", ["--chunk", "-2"], "--chunk must be >= 1"),
    ("ok.txt", ["--policy", "window"], "needs a budget"),
])
def test_perplexity_cli_bad_inputs(capsys, tmp_path, name, extra, message):
    folder = _bad_files(tmp_path)
    code, out, err = _run(capsys, "perplexity", "--model", "tiny-llama", "--text-file", str(folder / name), *extra)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


# --------------------------------------------------------------------------- bench scenarios


def _bench_args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path / "out"), "--no-progress", "--model", "tiny-llama", *extra])


def test_perplexity_scenario(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("A bench text that repeats itself, more or less. " * 6)
    args = _bench_args(tmp_path, "--scenario", "perplexity", "--policies", "full,kv-direct,window,streaming",
                       "--budgets", "8,24", "--max-tokens", "90", "--chunk", "6", "--text-file", str(text))
    assert bench_cli.run(args, model_and_tokenizer=_loaded()) == 0
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    assert data["scenario"] == "perplexity" and data["meta"]["options"]["chunk"] == 6
    assert [(r["policy"], r["budget"]) for r in runs] == [("full", None), ("kv-direct", 8), ("kv-direct", 24),
                                                          ("window", 8), ("window", 24), ("streaming", 8),
                                                          ("streaming", 24)]
    full = runs[0]
    assert full["tokens"] == 89 and full["status"] == "ok"
    for r in runs[1:]:
        assert r["status"] == "ok" and r["ppl_ratio_vs_full"] == pytest.approx(r["perplexity"] / full["perplexity"])
        if r["exact"]:
            assert r["ppl_ratio_vs_full"] == pytest.approx(1.0, abs=1e-3)
        else:
            assert abs(r["ppl_ratio_vs_full"] - 1) > 1e-3
    report = (out / "report.md").read_text()
    assert "| `kv-direct` | exact |" in report and "loses least" in report
    assert (out / "perplexity.png").stat().st_size > 5000


def test_needle_scenario(tmp_path):
    args = _bench_args(tmp_path, "--scenario", "needle", "--policies", "full,kv-direct,window", "--budgets", "40",
                       "--lengths", "600,700", "--depths", "0,1", "--kinds", "single", "--chunk", "128",
                       "--rerun-max-length", "650")
    assert bench_cli.run(args, model_and_tokenizer=_loaded()) == 0
    out = tmp_path / "out"
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 3 + 2 * 2  # kv-direct (reruns_model) only at 600 <= --rerun-max-length
    assert {(r["length"], r["depth"]) for r in runs} == {(600, 0.0), (600, 1.0), (700, 0.0), (700, 1.0)}
    assert {r["length"] for r in runs if r["policy"] == "kv-direct"} == {600}
    for r in runs:
        assert r["status"] == "ok" and isinstance(r["found"], bool) and r["prompt_tokens"] <= r["length"]
        assert 0 < r["cpu_seconds"]
        if r["policy"] == "kv-direct":
            assert r["same_as_full"] and r["answer_matches_full"]
    report = (out / "report.md").read_text()
    assert "budget 40" in report and "| `kv-direct` | exact |" in report
    assert "**Not run**: `kv-direct` at lengths [700] (`--rerun-max-length 650`" in report
    assert "`kv-direct`: hit/miss equal to `full` in 2/2 cells, same answer text in 2/2 (lengths 600)" in report
    assert "| policy | budget | 600 tokens | 700 tokens |" in report
    assert (out / "needle_heatmap.png").stat().st_size > 5000

    # a second run at another length, merged with the first (kvbound bench merge)
    more = _bench_args(tmp_path, "--scenario", "needle", "--policies", "full,kv-direct", "--budgets", "40",
                       "--lengths", "640", "--depths", "0.5", "--kinds", "multikey", "--chunk", "128")
    more.out = str(tmp_path / "more")
    assert bench_cli.run(more, model_and_tokenizer=_loaded()) == 0
    merge = _bench_args(tmp_path, "merge", str(out), str(tmp_path / "more"))
    merge.out = str(tmp_path / "merged")
    assert bench_cli.run(merge) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert len(merged["runs"]) == len(runs) + 2
    assert merged["meta"]["options"]["lengths"] == [600, 640, 700]
    assert merged["meta"]["options"]["kinds"] == ["single", "multikey"]
    assert [m["command"] for m in merged["meta"]["merged_from"]] == [json.loads((d / "results.json").read_text())[
        "meta"]["command"] for d in (out, tmp_path / "more")]
    report = (tmp_path / "merged" / "report.md").read_text()
    assert "- **Merged from**" in report and "| policy | budget | single | multikey | mean seconds |" in report


def test_needle_exact_check_flags_a_differing_cell():
    from kvbound.bench.scenarios.needle import exact_check

    cell = dict(kind="single", length=900, depth=0.5, budget=64, exact=True, status="ok")
    runs = [dict(cell, policy="full", budget=None, found=True, answer="1234567"),
            dict(cell, policy="offload", found=True, answer="1234567", same_as_full=True, answer_matches_full=True),
            dict(cell, policy="kv-direct", found=False, answer="123", same_as_full=False, answer_matches_full=False)]
    text = exact_check(runs)
    assert "`offload`: hit/miss equal to `full` in 1/1 cells, same answer text in 1/1 (lengths 900)" in text
    assert "`kv-direct`: hit/miss equal to `full` in 0/1 cells" in text and "NOT EQUAL: a bug" in text
    assert "differs: single 900 @ 0.5, budget 64: answer '123'" in text


@pytest.mark.parametrize("extra, message", [
    (["--scenario", "needle", "--depths", "0,1.5"], "--depths"),
    (["--scenario", "needle", "--kinds", "single,haystack"], "--kinds"),
    (["--scenario", "needle", "--rerun-max-length", "-1"], "--rerun-max-length must be >= 0"),
    (["--scenario", "perplexity", "--chunk", "0"], "--chunk must be >= 1"),
    (["--scenario", "perplexity", "--max-tokens", "1"], "--max-tokens must be >= 2"),
])
def test_quality_scenarios_bad_arguments(tmp_path, extra, message):
    with pytest.raises(KVBoundError, match=message):
        bench_cli.run(_bench_args(tmp_path, *extra), model_and_tokenizer=_loaded())
    assert not (tmp_path / "out" / "results.json").exists()


# --------------------------------------------------------------------------- SmolLM2


@pytest.mark.slow
def test_smollm2_kv_direct_perplexity_equals_full():
    from kvbound.quality import corpus

    model, tok = real_model()
    ids = tok(corpus.book_text(), return_tensors="pt")["input_ids"][:, :160]
    ref = perplexity(model, ids, kvbound.make_cache(model, "full"), chunk=40)
    got = perplexity(model, ids, kvbound.make_cache(model, "kv-direct", 32), chunk=40)
    assert 2 < ref.perplexity < 200  # a real model on English prose
    assert got.perplexity == pytest.approx(ref.perplexity, rel=1e-3)


@pytest.mark.long
def test_smollm2_needle_full_finds_it_and_exact_policies_agree():
    model, tok = real_model()
    task = needle.make_task(tok, 1024, 0.5, "multikey")
    ref = needle.run_task(model, tok, task, kvbound.make_cache(model, "full"), prefill_chunk=256)
    assert ref.found, ref.answer
    for policy in ["kv-direct", "offload"]:
        cache = kvbound.make_cache(model, policy, 128)
        try:
            assert needle.run_task(model, tok, task, cache, prefill_chunk=256).answer == ref.answer
        finally:
            cache.close()
