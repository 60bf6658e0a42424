"""Chunked prefill through every entry point, its bad input, and the long bench scenario (tiny models)."""

from __future__ import annotations

import errno
import functools
import json
import os

import pytest

from kvbound import make_cache
from kvbound.cache import registered
from kvbound.errors import KVBoundError
from kvbound.generation import Timings, chunked_part, greedy, prefill
from kvbound.speculative import speculative_greedy

from conftest import prompt_ids, tiny

EXACT = [name for name, spec in registered().items() if spec.exact]
BUDGETED = [name for name, spec in registered().items() if spec.needs_budget]
PROMPT, BUDGET, NEW = 24, 6, 4


# random-init tiny models have no retrieval heads above razor's default 2x-chance threshold
TINY_OPTIONS = {"razor": {"threshold": 0.0, "sinks": 1, "recent": 2}}


def _run(model, policy, ids, chunk, budget=BUDGET):
    spec = registered()[policy]
    cache = make_cache(model, policy, budget if spec.needs_budget else None, **TINY_OPTIONS.get(policy, {}))
    try:
        return greedy(model, ids, cache, NEW, stop_at_eos=False, prefill_chunk=chunk)[0].tolist(), cache
    finally:
        cache.close()


@functools.lru_cache(maxsize=None)
def _one_shot_full(name: str) -> list[int]:
    return _run(tiny(name), "full", prompt_ids(PROMPT, seed=3), None)[0]


# chunk 1, uneven chunks, and one larger than the prompt (one pass); tiny-gemma3 has sliding layers
@pytest.mark.parametrize("name,chunk", [("tiny-llama", 1), ("tiny-llama", 7), ("tiny-llama", 64),
                                        ("tiny-gemma3", 1), ("tiny-gemma3", 5), ("tiny-gemma3", 64)])
def test_exact_policies_token_identical_with_chunked_prefill(name, chunk):
    """Every exact policy of the registry, prefilled in chunks = full with one-shot prefill."""
    model = tiny(name)
    ids = prompt_ids(PROMPT, seed=3)
    for policy in EXACT:
        got, cache = _run(model, policy, ids, chunk)
        assert got == _one_shot_full(name), policy
        assert cache.get_seq_length() == PROMPT + NEW - 1


@pytest.mark.parametrize("chunk", [1, 7])
def test_hot_kv_bounded_by_budget_plus_chunk(chunk):
    """Every budgeted policy's hot K/V stays within budget + chunk tokens during a chunked prefill,
    while full's grows with the prompt (so the bound is not vacuous)."""
    model = tiny("tiny-llama")
    ids = prompt_ids(PROMPT, seed=4)
    _, full = _run(model, "full", ids, chunk)
    per_token = full.kv_bytes_per_token
    assert full.peak_hot_kv_bytes == (PROMPT + NEW - 1) * per_token
    for policy in BUDGETED:
        _, cache = _run(model, policy, ids, chunk)
        assert 0 < cache.peak_hot_kv_bytes <= (BUDGET + chunk) * per_token, policy


def test_chunked_part_leaves_the_last_chunk_to_decoding():
    assert chunked_part(0, 40, None) == 0
    assert chunked_part(0, 40, 64) == 0  # fits one chunk: no separate prefill
    assert chunked_part(0, 40, 16) == 32  # 16 + 16 fed, the last 8 with the first decoding step
    assert chunked_part(0, 32, 16) == 16  # never an empty last chunk
    assert chunked_part(10, 40, 7) == 38  # continues after tokens already in the cache
    assert chunked_part(0, 40, 1) == 39


def test_speculative_with_chunked_prefill_matches_greedy():
    model = tiny("tiny-llama")
    ids = prompt_ids(PROMPT, seed=5)
    ref, _ = _run(model, "full", ids, None)
    for chunk in (1, 16, None):
        cache = make_cache(model, "offload", BUDGET)
        timings = Timings()
        new, stats = speculative_greedy(model, ids, cache, k=3, max_new_tokens=NEW, prefill_chunk=chunk,
                                        timings=timings)
        cache.close()
        assert new[0].tolist() == ref, chunk
        assert timings.prefill_seconds > 0 and timings.decode_seconds > 0 and timings.new_tokens == NEW


def test_timings_split():
    model = tiny("tiny-llama")
    timings = Timings()
    cache = make_cache(model, "full")
    greedy(model, prompt_ids(PROMPT), cache, NEW, stop_at_eos=False, prefill_chunk=16, timings=timings)
    assert timings.prefill_seconds > 0 and timings.decode_seconds > 0
    assert timings.new_tokens == NEW and len(timings.stamps) == NEW
    assert timings.seconds_per_token == pytest.approx(timings.decode_seconds / (NEW - 1))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("chunk", [0, -3, True, 2.5])
def test_bad_chunk(chunk):
    model = tiny("tiny-llama")
    cache = make_cache(model, "full")
    with pytest.raises(KVBoundError, match="prefill chunk"):
        greedy(model, prompt_ids(8), cache, 2, prefill_chunk=chunk)
    with pytest.raises(KVBoundError, match="prefill chunk"):
        prefill(model, prompt_ids(8), cache, chunk)
    with pytest.raises(KVBoundError, match="prefill chunk"):
        speculative_greedy(model, prompt_ids(8), make_cache(model, "kv-direct", 4), max_new_tokens=2,
                           prefill_chunk=chunk)


def test_prompt_longer_than_positions_names_the_limit():
    model = tiny("tiny-llama")  # 1024 positions
    cache = make_cache(model, "offload", 16)
    try:
        with pytest.raises(KVBoundError, match="at most 1024 positions"):
            greedy(model, prompt_ids(1030), cache, 2)
        with pytest.raises(KVBoundError, match="1024 positions"):
            greedy(model, prompt_ids(1020), cache, 8)
        with pytest.raises(KVBoundError, match="at most 1024 positions"):
            speculative_greedy(model, prompt_ids(1030), cache, max_new_tokens=2)
        assert cache.get_seq_length() == 0  # refused before any forward pass
    finally:
        cache.close()


def _offload_dirs(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.startswith("kvbound-offload-")]


@pytest.mark.parametrize("call", ["posix_fallocate", "pwrite"])
def test_full_disk_during_chunked_prefill(tmp_path, monkeypatch, call):
    """ENOSPC while the offload store is written mid-prefill: one clear error, the temp folder removed."""
    import kvbound.cache.offload as offload

    model = tiny("tiny-llama")
    cache = make_cache(model, "offload", 8, dir=str(tmp_path))
    assert len(_offload_dirs(tmp_path)) == 1

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(offload.os, call, full)
    with pytest.raises(KVBoundError, match="out of disk space"):
        greedy(model, prompt_ids(PROMPT), cache, 2, prefill_chunk=16)
    cache.close()
    assert _offload_dirs(tmp_path) == []


def test_cli_full_disk_leaves_no_temp_folder(tmp_path, monkeypatch, capsys):
    import kvbound.cache.offload as offload
    from kvbound.cli import main

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(offload.os, "pwrite", full)
    code = main(["generate", "--model", "tiny-llama", "--prompt", "x" * 60, "--policy", "offload", "--budget", "8",
                 "--prefill-chunk", "16", "--max-new-tokens", "2", "--option", f"dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "out of disk space" in err[0]
    assert _offload_dirs(tmp_path) == []


def test_cli_prefill_chunk_and_split_timings(capsys):
    from kvbound.cli import main

    assert main(["generate", "--model", "tiny-llama", "--prompt", "y" * 50, "--prefill-chunk", "0"]) == 2
    assert "--prefill-chunk must be >= 1" in capsys.readouterr().err
    argv = ["generate", "--model", "tiny-llama", "--prompt", "hello world " * 5, "--policy", "offload",
            "--budget", "8", "--max-new-tokens", "4", "--json"]
    assert main(argv + ["--prefill-chunk", "7"]) == 0
    chunked = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(argv + ["--prefill-chunk", "1000"]) == 0
    one_shot = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert chunked["token_ids"] == one_shot["token_ids"] and chunked["prefill_chunk"] == 7
    for result in (chunked, one_shot):
        assert result["peak_rss_bytes"] > 2**20
        assert result["prefill_seconds"] > 0 and result["decode_seconds"] > 0
        assert result["prefill_seconds"] + result["decode_seconds"] <= result["seconds"] + 1e-3


# --------------------------------------------------------------------------- the long bench scenario


def test_haystack_has_the_length_asked_and_ends_with_the_question():
    from kvbound.bench.inputs import haystack_ids
    from kvbound.models import load

    _, tok = load("tiny-llama")
    for n in (200, 5000):
        ids, answer = haystack_ids(tok, n)
        assert ids.shape == (1, n)
        text = tok.decode(ids[0].tolist())
        assert text.startswith("Part 1.\n") and text.rstrip().endswith("Answer: The spare key to the oil store is kept")
        assert answer == "bell"
    assert "Part 4." in tok.decode(haystack_ids(tok, 12000)[0][0].tolist())  # passages repeat
    with pytest.raises(KVBoundError, match="long prompt needs more than"):
        haystack_ids(tok, 10)


def test_long_plan_and_comparison():
    from kvbound.bench.long import compare, plan_jobs

    jobs = plan_jobs(["tiny-llama"], [300, 2000], ["offload", "full", "window"], [64], 4, 256, 1, 1000, 8)
    labels = [(j.tokens, j.policy, j.chunk, j.speculate) for j in jobs]
    assert labels == [(300, "full", 256, None), (300, "full", None, None), (300, "offload", 256, None),
                      (300, "offload", 256, 8), (300, "window", 256, None),
                      (2000, "full", 256, None), (2000, "offload", 256, None), (2000, "offload", 256, 8),
                      (2000, "window", 256, None)]  # no one-shot run above one_shot_max
    ref = {"status": "ok", "token_ids": [1, 2, 3, 4], "rss_added_bytes": 400, "prefill_seconds": 2.0,
           "seconds_per_token": 0.5}
    rec = compare({"status": "ok", "token_ids": [1, 2, 9, 4], "rss_added_bytes": 100, "prefill_seconds": 3.0,
                   "seconds_per_token": 0.25}, ref)
    assert rec["token_match"] == 0.75 and rec["first_divergence"] == 2
    assert rec["rss_added_ratio_vs_full"] == 0.25 and rec["prefill_ratio_vs_full"] == 1.5
    assert rec["decode_ratio_vs_full"] == 0.5


def test_long_run_job_reports_process_memory_and_split_timings():
    from kvbound.bench.long import LongJob, run_job

    rec = run_job(LongJob("tiny-llama", "offload", 300, budget=32, new_tokens=4, chunk=64))
    assert rec["status"] == "ok" and len(rec["token_ids"]) == 4
    assert rec["peak_rss_bytes"] >= rec["loaded_rss_bytes"] > 2**20
    assert rec["rss_added_bytes"] == rec["peak_rss_bytes"] - rec["loaded_rss_bytes"]
    assert rec["peak_hot_kv_bytes"] <= (32 + 64) * rec["full_kv_bytes"] // (300 + 3)
    assert rec["bytes_by_tier"]["offloaded"] > 0 and rec["prefill_seconds"] > 0 and rec["seconds_per_token"] > 0
    assert rec["model_info"]["layers"] == 3 and rec["model_info"]["model_type"] == "llama"


def test_long_report_names_each_model_from_its_workers():
    from kvbound.bench.scenarios.long_context import long_md

    runs = [{"status": "ok", "model": m, "tokens": 64, "policy": "full", "budget": None, "chunk": 32,
             "peak_rss_bytes": 2**20, "rss_added_bytes": 2**19, "peak_hot_kv_bytes": 1, "total_cache_bytes": 1,
             "prefill_seconds": 1.0, "seconds_per_token": 0.1,
             "model_info": {"name": m, "model_type": t, "layers": n, "hidden_size": 8, "kv_heads": 1, "head_dim": 4,
                            "dtype": "float32"}}
            for m, t, n in [("a", "llama", 30), ("b", "gemma3_text", 18)]]
    md = long_md({"meta": {"model": {"name": "a,b"}, "hardware": {}, "versions": {}}, "runs": runs}, [])
    assert "`a` (llama, 30 layers" in md and "`b` (gemma3_text, 18 layers" in md and "? layers" not in md


def test_long_merge_compares_every_run_with_the_kept_full(tmp_path):
    """A re-run of a few cells merged first (``kvbound bench merge RERUN RUN``) replaces them, and
    every run of the merged table is compared again with the one ``full`` kept at its length."""
    from kvbound.bench.long import compare
    from kvbound.bench.merge import merge

    def run(policy, tokens, per_token, ids, chunk=64):
        return {"status": "ok", "model": "m", "tokens": tokens, "policy": policy, "budget": None if policy == "full"
                else 32, "chunk": chunk, "token_ids": ids, "rss_added_bytes": 100, "prefill_seconds": 2.0,
                "seconds_per_token": per_token, "peak_rss_bytes": 2**20, "peak_hot_kv_bytes": 1, "total_cache_bytes": 1,
                "model_info": {"name": "m", "model_type": "llama", "layers": 2, "hidden_size": 8, "kv_heads": 1,
                               "head_dim": 4, "dtype": "float32"}}

    def write(name, runs):
        folder = tmp_path / name
        folder.mkdir()
        ref = runs[0]
        data = {"schema": 1, "scenario": "long", "meta": {"command": name, "options": {"lengths": [300]},
                                                           "hardware": {}, "versions": {}, "model": {"name": "m"}},
                "runs": [ref] + [compare(dict(r), ref) for r in runs[1:]], "turns": [], "extra": {}}
        (folder / "results.json").write_text(json.dumps(data))
        return folder

    first = write("first", [run("full", 300, 0.5, [1, 2, 3, 4]), run("full", 300, 0.6, [1, 2, 3, 4], chunk=None),
                            run("window", 300, 0.25, [1, 2, 9, 9]), run("razor", 300, 2.0, [1, 9, 9, 9])])
    rerun = write("rerun", [run("full", 300, 0.4, [1, 2, 3, 4]), run("razor", 300, 0.2, [1, 2, 3, 9])])
    merge(tmp_path / "merged", [rerun, first])
    runs = {(r["policy"], r["chunk"]): r for r in json.loads((tmp_path / "merged" / "results.json").read_text())["runs"]}
    assert set(runs) == {("full", 64), ("full", None), ("window", 64), ("razor", 64)}
    assert runs[("full", 64)]["seconds_per_token"] == 0.4 and "decode_ratio_vs_full" not in runs[("full", 64)]
    assert runs[("razor", 64)]["decode_ratio_vs_full"] == 0.5 and runs[("razor", 64)]["token_match"] == 0.75
    assert runs[("window", 64)]["decode_ratio_vs_full"] == 0.625  # was 0.5 against the first run's full
    assert runs[("full", None)]["decode_ratio_vs_full"] == pytest.approx(1.5)
    assert runs[("full", None)]["chunked_over_one_shot_prefill"] == 1.0


def test_long_worker_prepares_the_policy_before_it_measures(kv_home, monkeypatch):
    """razor's head map (a calibration pass, once per model) is never in a measured run: a worker
    that had to measure it stops there, and the job runs again in a fresh process that reads the
    map before the RSS high-water mark is lowered (the calibration's freed memory would otherwise sit
    in the run's baseline and hide what the cache adds)."""
    import kvbound.rss
    from kvbound.bench import long
    from kvbound.bench.long import PREPARED, LongJob, run_job
    from kvbound.cache.razor import RazorCache

    events = []
    prepare, reset = RazorCache.prepare.__func__, kvbound.rss.reset_peak_rss
    monkeypatch.setattr(RazorCache, "prepare",
                        classmethod(lambda cls, m: (events.append("prepare"), prepare(cls, m))[1]))
    monkeypatch.setattr(kvbound.rss, "reset_peak_rss", lambda: (events.append("reset"), reset())[1])
    job = LongJob("tiny-llama", "razor", 300, budget=32, new_tokens=2, chunk=64,
                  options={"threshold": 0.0, "fraction": 0.34})
    assert run_job(job)["status"] == PREPARED and events == ["prepare"]
    rec = run_job(job)
    assert rec["status"] == "ok" and events == ["prepare", "prepare", "reset"]
    calls = []
    monkeypatch.setattr(long, "_spawn_once", lambda j, t: calls.append(j) or (
        {"status": PREPARED} if len(calls) == 1 else {"status": "ok"}))
    assert long.spawn(job)["status"] == "ok" and len(calls) == 2
    assert list((kv_home / "razor").glob("heads-*.json"))
