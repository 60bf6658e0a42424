"""kvbound bench: metric definitions, budgets/arguments, results.json schema, interrupt safety."""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from kvbound.bench import cli as bench_cli
from kvbound.bench import metrics
from kvbound.bench.inputs import Conversation, load_messages, load_prompts, parse_budgets
from kvbound.bench.scenarios.bytes_per_token import analytic_bytes
from kvbound.errors import KVBoundError


# --------------------------------------------------------------------------- metrics


def test_token_metrics_on_constructed_sequences():
    ref = [5, 6, 7, 8]
    assert metrics.token_match(ref, [5, 6, 9, 8]) == 0.75
    assert metrics.prefix_match(ref, [5, 6, 9, 8]) == 0.5
    assert metrics.first_divergence(ref, [5, 6, 9, 8]) == 2
    assert metrics.first_divergence(ref, [1, 6, 7, 8]) == 0
    assert metrics.prefix_match(ref, [1, 6, 7, 8]) == 0.0
    assert metrics.token_match(ref, [1, 6, 7, 8]) == 0.75  # later positions still count
    assert metrics.first_divergence(ref, list(ref)) is None
    assert metrics.token_match(ref, list(ref)) == metrics.prefix_match(ref, list(ref)) == 1.0
    # a shorter output is wrong at the missing positions
    assert metrics.first_divergence(ref, [5, 6]) == 2
    assert metrics.token_match(ref, [5, 6]) == 0.5
    assert metrics.prefix_match(ref, [5, 6]) == 0.5


def test_kl_identical_is_zero_and_matches_definition():
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    assert metrics.mean_kl(logits, logits.clone()) == 0.0
    assert metrics.mean_kl(logits, logits + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-invariant
    p, q = [0.5, 0.5], [0.25, 0.75]
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    got = metrics.mean_kl(torch.tensor([p], dtype=torch.float64).log(), torch.tensor([q], dtype=torch.float64).log())
    assert got == pytest.approx(kl_pq, rel=1e-6)
    assert got != pytest.approx(kl_qp, rel=1e-3)  # direction is KL(reference || policy)
    rows = metrics.kl_per_position(torch.tensor([p, p], dtype=torch.float64).log(), torch.tensor([q, p], dtype=torch.float64).log())
    assert rows.tolist() == pytest.approx([kl_pq, 0.0], abs=1e-9)
    with pytest.raises(ValueError):
        metrics.mean_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_rss_is_positive():
    assert metrics.rss_bytes() > 10 * 2**20


# --------------------------------------------------------------------------- arguments


def test_parse_budgets():
    tok = parse_budgets("32, 128")
    assert [(b.value, b.is_fraction) for b in tok] == [(32, False), (128, False)]
    frac = parse_budgets("0.25,1.0")
    assert [b.is_fraction for b in frac] == [True, True]
    assert frac[0].tokens(100) == 25 and frac[1].tokens(37) == 37 and frac[0].tokens(2) == 1
    for bad in ["1.5", "0", "-0.5", "0.0", "abc", "", "0.5,64"]:
        with pytest.raises(KVBoundError):
            parse_budgets(bad)


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    return parser.parse_args(["--out", str(tmp_path / "out"), "--no-progress", *extra])


@functools.lru_cache(maxsize=None)
def _tiny(name: str = "tiny-llama"):
    from kvbound.models import load

    return load(name)


@pytest.mark.parametrize("extra, message", [
    (["--policies", "full,nope"], "unknown policy 'nope'"),
    (["--budgets", "1.5"], "outside (0,1]"),
    (["--budgets", "0"], ">= 1 token"),
    (["--prompt-file", "/no/such/prompt.txt"], "does not exist"),
    (["--prompts-dir", "/no/such/dir"], "does not exist"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--scenario", "multiturn", "--budgets", "0.5"], "tokens"),
])
def test_bad_arguments_raise_one_line_errors(tmp_path, extra, message):
    with pytest.raises(KVBoundError) as err:
        bench_cli.run(_args(tmp_path, "--model", "tiny-llama", *extra), model_and_tokenizer=_tiny())
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "results.json").exists()  # nothing is run on bad input


def test_builtin_data_is_long_and_complete():
    prompts = load_prompts()
    assert len(prompts) >= 3 and all(len(p.text.split()) > 400 for p in prompts)
    assert any(p.answer for p in prompts)  # the needle prompt carries its answer
    assert len(load_messages()) >= 20


# --------------------------------------------------------------------------- runs on a tiny model


def _prompt_dir(tmp_path):
    d = tmp_path / "prompts"
    d.mkdir()
    (d / "alpha.txt").write_text("The harbour master keeps the ledger in the red box. " * 2)
    (d / "beta.txt").write_text("Bees visit the orchard in spring when the blossoms open. " * 2)
    (d / "answers.json").write_text(json.dumps({"alpha": "ledger"}))
    return d


RUN_FIELDS = {"policy", "exact", "budget", "budget_label", "prompt", "prompt_tokens", "new_tokens", "status",
              "token_match", "prefix_match", "first_divergence", "mean_kl", "peak_hot_kv_bytes", "bytes_by_tier",
              "peak_transient_bytes", "total_cache_bytes", "seconds_per_token", "time_ratio_vs_full", "needle_found",
              "peak_rss_bytes", "rss_added_bytes"}


def test_budget_sweep_schema_and_reference(tmp_path):
    prompts = _prompt_dir(tmp_path)
    args = _args(tmp_path, "--model", "tiny-llama", "--policies", "window,streaming", "--budgets", "4,8,400",
                 "--max-new-tokens", "5", "--prompts-dir", str(prompts))
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["scenario"] == "budget-sweep"
    meta = data["meta"]
    assert {"date", "command", "model", "versions", "hardware", "options"} <= set(meta)
    assert {"platform", "cpu", "torch_threads"} <= set(meta["hardware"]) and meta["interrupted"] is False
    runs = data["runs"]
    # full once per prompt + 2 policies x 3 budgets per prompt
    assert len(runs) == 2 * (1 + 2 * 3)
    assert [r["prompt"] for r in runs if r["policy"] == "full"] == ["alpha", "beta"]
    skipped = [r for r in runs if r["status"] == "skipped"]
    assert {(r["policy"], r["budget"]) for r in skipped} == {("streaming", 4)}  # budget <= its 4 sink tokens
    assert all(r["reason"] for r in skipped)
    for r in runs:
        if r["status"] != "ok":
            continue
        assert RUN_FIELDS <= set(r), RUN_FIELDS - set(r)
        assert r["new_tokens"] == 5 and 0 <= r["token_match"] <= 1 and r["mean_kl"] >= 0
        assert r["bytes_by_tier"]["hot_kv"] <= r["peak_hot_kv_bytes"]
        assert r["peak_rss_bytes"] > 2**20 and 0 <= r["rss_added_bytes"] <= r["peak_rss_bytes"]
        assert r["needle_found"] is None if r["prompt"] == "beta" else isinstance(r["needle_found"], bool)
        if r["policy"] == "full":
            assert r["token_match"] == 1.0 and r["mean_kl"] == 0.0 and r["time_ratio_vs_full"] == 1.0
            assert r["first_divergence"] is None and r["budget"] is None
        else:
            full = next(f for f in runs if f["policy"] == "full" and f["prompt"] == r["prompt"])
            assert r["time_ratio_vs_full"] == pytest.approx(r["seconds_per_token"] / full["seconds_per_token"])
            if r["budget"] == 400:  # budget above prompt + new tokens: nothing is evicted, so exact
                assert r["token_match"] == 1.0 and r["mean_kl"] == pytest.approx(0.0, abs=1e-10)
            if r["budget"] == 4:  # a 4-token window holds far less than full
                assert r["peak_hot_kv_bytes"] < full["peak_hot_kv_bytes"] / 4
    report = (out / "report.md").read_text()
    assert "| `window` |" in report and "**Machine**" in report
    for png in ["token_match.png", "time_ratio.png", "hot_kv.png"]:
        assert (out / png).stat().st_size > 5000
    # the report is rendered from results.json alone
    (out / "report.md").unlink()
    assert bench_cli.run(_args(tmp_path, "--report-only")) == 0
    assert (out / "report.md").read_text() == report


def test_interrupt_keeps_finished_runs(tmp_path):
    prompts = _prompt_dir(tmp_path)
    args = _args(tmp_path, "--model", "tiny-llama", "--policies", "window", "--budgets", "4,8,16",
                 "--max-new-tokens", "3", "--prompts-dir", str(prompts))
    seen = []

    def stop_after_three(record):
        seen.append(record)
        if len(seen) == 3:
            raise KeyboardInterrupt

    assert bench_cli.run(args, model_and_tokenizer=_tiny(), on_record=stop_after_three) == 130
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(data["runs"]) == 3 and data["meta"]["interrupted"] is True
    assert [r["budget"] for r in data["runs"]] == [None, 4, 8]
    assert "Interrupted" in (tmp_path / "out" / "report.md").read_text()
    assert not list((tmp_path / "out").glob(".*.tmp"))  # atomic writes leave no temp files


def test_multiturn_schema(tmp_path):
    args = _args(tmp_path, "--scenario", "multiturn", "--model", "tiny-llama", "--policies", "full,window",
                 "--budgets", "12", "--turns", "3", "--max-new-tokens", "4")
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    turns = data["turns"]
    assert [(t["policy"], t["turn"]) for t in turns] == [(p, i) for p in ["full", "window"] for i in (1, 2, 3)]
    for t in turns:
        assert {"turn", "policy", "hot_kv_bytes", "total_cache_bytes", "rss_bytes", "reply_matches_full"} <= set(t)
        assert t["rss_bytes"] > 0 and t["total_cache_bytes"] >= t["hot_kv_bytes"] > 0
    full = [t for t in turns if t["policy"] == "full"]
    window = [t for t in turns if t["policy"] == "window"]
    assert all(t["reply_matches_full"] for t in full)
    assert [t["hot_kv_bytes"] for t in full] == sorted(t["hot_kv_bytes"] for t in full)  # full only grows
    assert max(t["hot_kv_bytes"] for t in window) < full[-1]["hot_kv_bytes"]
    assert {r["policy"]: r["turns"] for r in data["runs"]} == {"full": 3, "window": 3}
    assert (tmp_path / "out" / "cache_bytes.png").stat().st_size > 5000


def test_conversation_ids_only_grow():
    _, tok = _tiny()
    conv = Conversation(tok, eos=2)
    first = conv.add_user("hello there").tolist()[0]
    conv.add_reply([104, 105, 2])  # "hi" + end of turn
    second = conv.add_user("how are you").tolist()[0]
    assert second[:len(first)] == first and second[len(first):len(first) + 2] == [104, 105]
    assert tok.decode(second).endswith("how are you\nassistant:")


def test_bytes_scenario_matches_analytic(tmp_path):
    prompts = _prompt_dir(tmp_path)
    args = _args(tmp_path, "--scenario", "bytes", "--model", "tiny-llama", "--policies", "full,window",
                 "--budgets", "8", "--max-new-tokens", "3", "--prompt-file", str(prompts / "alpha.txt"))
    model, tok = _tiny()
    assert bench_cli.run(args, model_and_tokenizer=(model, tok)) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    analytic = data["extra"]["analytic_bytes_per_token"]
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert analytic == analytic_bytes(model)
    assert analytic["full_kv"] == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert analytic["layer0_residual"] == cfg.hidden_size * 4
    full, window = data["runs"]
    assert full["bytes_per_token"] == analytic["full_kv"]  # all layers full attention: measured == analytic
    assert window["bytes_by_tier"]["hot_kv"] == 8 * analytic["full_kv"]


def test_latency_scenario(tmp_path):
    args = _args(tmp_path, "--scenario", "latency", "--model", "tiny-llama", "--lengths", "8,32",
                 "--batch-sizes", "1,2")
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["tokens"], r["batch"]) for r in data["runs"]] == [(8, 1), (8, 2), (32, 1), (32, 2)]
    for r in data["runs"]:
        assert r["read_seconds"] > 0 and r["recompute_seconds"] > 0
        assert r["recompute_over_read"] == pytest.approx(r["recompute_seconds"] / r["read_seconds"])
    assert "recompute ÷ read" in (tmp_path / "out" / "report.md").read_text()


def test_dtype_runs_every_policy_in_it(tmp_path):
    """--dtype bfloat16: the model, the reference full and each policy run in bf16 (precision bench)."""
    from kvbound.models import load

    model, tok = load("tiny-llama")  # a fresh model: --dtype converts it in place
    args = _args(tmp_path, "--policies", "full,kv-direct,offload", "--budgets", "4", "--max-new-tokens", "4",
                 "--prompts-dir", str(_prompt_dir(tmp_path)), "--dtype", "bfloat16")
    assert bench_cli.run(args, model_and_tokenizer=(model, tok)) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["meta"]["model"]["dtype"] == "bfloat16" and data["meta"]["options"]["dtype"] == "bfloat16"
    assert {r["status"] for r in data["runs"]} == {"ok"} and len(data["runs"]) == 2 * 3
    full = next(r for r in data["runs"] if r["policy"] == "full")
    assert full["peak_hot_kv_bytes"] % 2 == 0 and model.dtype == torch.bfloat16


def test_random_weights_model_from_a_config(tmp_path):
    """--model random:CONFIG.json: the architecture of a config with seeded random weights (GPU timing runs)."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2).save_pretrained(tmp_path / "cfg")
    model, tok = bench_cli.load_model(f"random:{tmp_path / 'cfg' / 'config.json'}", seed=3)
    again, _ = bench_cli.load_model(f"random:{tmp_path / 'cfg'}", seed=3)
    assert model.config.num_hidden_layers == 2 and tok("ab")["input_ids"]
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(KVBoundError, match="cannot read a model config"):
        bench_cli.load_model(f"random:{tmp_path / 'missing.json'}")


# --------------------------------------------------------------------------- registry, renderers, report


def test_registry_modules_follow_the_contract():
    """Every registered scenario is one module with options/run/render and a one-line summary."""
    from kvbound.bench import scenarios

    assert scenarios.names()[:7] == ["budget-sweep", "multiturn", "bytes", "latency", "perplexity", "needle", "long"]
    for name in scenarios.names():
        module = scenarios.get(name)
        assert callable(module.options) and callable(module.run) and callable(module.render), name
        assert 20 < len(scenarios.summary(name)) < 200 and "``" not in scenarios.summary(name), name
    with pytest.raises(KVBoundError, match="unknown scenario 'nope'"):
        scenarios.get("nope")


def test_policy_variants_parse_and_build():
    from kvbound.bench.runner import _cache_for, policy_name, policy_options, split_policies

    assert split_policies("full,kivi:bits=2,group=32,offload:codec=int8,window") == [
        "full", "kivi:bits=2,group=32", "offload:codec=int8", "window"]
    assert policy_name("kivi:bits=2,group=32") == "kivi"
    assert policy_options("kivi:bits=2,clip=false,x=0.5") == {"bits": 2, "clip": False, "x": 0.5}
    with pytest.raises(KVBoundError, match="key=value"):
        policy_options("kivi:bits")
    cache = _cache_for(_tiny()[0], "kivi:bits=4", None)
    assert cache.policy_name == "kivi"
    with pytest.raises(KVBoundError, match="unknown policy 'nope'"):
        bench_cli.select_policies("full,nope:x=1")


def _synthetic(scenario: str, runs: list[dict], extra: dict | None = None, options: dict | None = None) -> dict:
    return {"schema": 1, "scenario": scenario, "runs": runs, "turns": [], "extra": extra or {},
            "meta": {"date": "2026-01-01T00:00:00+00:00", "command": f"kvbound bench --scenario {scenario}",
                     "commit": "abc123", "model": {"name": "tiny"}, "versions": {"torch": "x"},
                     "hardware": {"cpu": "cpu", "cpu_count": 2, "load_average_start": [1.0, 1.0, 1.0],
                                  "load_average_end": [2.0, 1.0, 1.0], "machine": "box"},
                     "options": options or {}}}


def _write(tmp_path, name: str, data: dict):
    d = tmp_path / "results" / name
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(data))
    return d


SYNTHETIC = {
    "decode": _synthetic("decode", [
        {"policy": "full", "exact": True, "budget": None, "tokens": 300, "status": "ok", "token_ids": [1, 2],
         "seconds_per_token": 0.01, "mean_seconds_per_token": 0.01, "cpu_seconds_per_token": 0.01,
         "time_ratio_vs_full": None, "peak_hot_kv_bytes": 2**20, "total_cache_bytes": 2**20},
        {"policy": "kv-direct", "exact": True, "budget": 64, "tokens": 300, "status": "ok", "token_ids": [1, 2],
         "seconds_per_token": 0.04, "mean_seconds_per_token": 0.04, "cpu_seconds_per_token": 0.03,
         "time_ratio_vs_full": 4.0, "cpu_ratio_vs_full": 3.0, "token_match": 1.0, "rebuild_seconds_per_token": 0.02},
        {"policy": "offload", "budget": 64, "tokens": 300, "status": "skipped", "reason": "no disk"}]),
    "prefill": _synthetic("prefill", [
        {"tokens": 300, "chunk": None, "repeat": 0, "status": "ok", "prefill_seconds": 2.0,
         "prefill_cpu_seconds": 2.0, "first_tokens": [5, 6]},
        {"tokens": 300, "chunk": 64, "repeat": 0, "status": "ok", "prefill_seconds": 1.0,
         "prefill_cpu_seconds": 1.5, "first_tokens": [5, 6]}]),
    "recompute-error": _synthetic("recompute-error", [
        {"policy": "kv-direct", "budget": 16, "tokens": 140, "grouping": "same rows", "status": "ok", "span": [0, 140],
         "rebuilt_layers": 2, "max_abs_dK": 0.0, "max_abs_dV": 0.0, "equal": True}]),
    "quantization": _synthetic("quantization", [
        {"stage": "perplexity", "policy": "full", "exact": True, "budget": None, "tokens": 100, "status": "ok",
         "perplexity": 10.0, "total_cache_bytes": 2**20, "bytes_by_tier": {"hot_kv": 2**20}},
        {"stage": "perplexity", "policy": "kivi:bits=4", "exact": False, "budget": None, "tokens": 100, "status": "ok",
         "perplexity": 10.5, "total_cache_bytes": 2**18, "bytes_by_tier": {"hot_kv": 2**18}},
        {"stage": "decode", "policy": "full", "tokens": 100, "status": "ok", "steps": 2, "token_ids": [1, 2],
         "seconds_per_token": 0.01},
        {"stage": "decode", "policy": "kivi:bits=4", "tokens": 100, "status": "ok", "steps": 2, "token_ids": [1, 3],
         "seconds_per_token": 0.02, "token_match": 0.5, "time_ratio_vs_ref": 2.0},
        {"stage": "decode", "policy": "offload", "budget": 8, "tokens": 900, "status": "ok", "steps": 2,
         "token_ids": [1, 3], "seconds_per_token": 0.02, "cold_seconds_per_token": 0.05,
         "bytes_by_tier": {"offloaded": 2**20}}], {"text_tokens": 100}),
    "serve-parking": _synthetic("serve-parking", [
        {"status": "ok", "label": label, "memory_budget": budget, "wall_s": 3.0, "baseline_rss_bytes": 2**28,
         "peak_rss_bytes": 2**28 + share, "cache_share_bytes": share,
         "stats": {"hot": hot, "parked": 2 - hot, "held_bytes": share, "parked_bytes": 100 * (2 - hot),
                   "parked_tokens": 25 * (2 - hot), "restores": 2 - hot, "parks": 2 - hot},
         "requests": [{"conversation": c, "turn": t, "ttft_s": 0.01 * (1 + t * (2 - hot)), "total_s": 0.1,
                       "prompt_tokens": 50 * (t + 1), "completion_tokens": 2, "reply": f"r{c}{t}"}
                      for t in range(2) for c in range(2)]}
        for label, budget, share, hot in (("unbounded", None, 2**20, 2), ("budgeted", 2**17, 2**17, 0))],
        options={"model": "tiny", "policy": "full", "budget": None, "conversations": 2, "turns": 2, "max_tokens": 2,
                 "hot_fraction": 0.1, "threads": 1}),
    "cluster": _synthetic("cluster", [
        {"status": "ok", "kind": "reference", "requests": 8, "seconds": 4.0, "requests_per_s": 2.0},
        {"status": "ok", "kind": "failover", "replicas": 2, "requests": 8, "seconds": 2.0, "requests_per_s": 4.0,
         "killed": {"at_request": 4, "replica": "r1"}, "conversations_lost": 1, "lost_examples": ["APIError: 503"],
         "replies_identical": 6, "conversations_differing": 0, "memory_budget_bytes": 2**20,
         "per_replica": {"r1": {"rss_after_load": 2**28, "peak_rss": 2**28 + 2**19, "requests_served": 4,
                                "restores": 1, "shared_restores": 0, "peak_over_load_plus_budget": 0.998},
                         "r2": {"rss_after_load": 2**28, "peak_rss": 2**28 + 2**20, "requests_served": 3,
                                "restores": 2, "shared_restores": 1, "peak_over_load_plus_budget": 1.0}},
         "end_totals": {}},
        {"status": "ok", "kind": "throughput", "replicas": 1, "requests": 4, "seconds": 2.0, "requests_per_s": 2.0,
         "loadavg": [1.0, 1.0, 1.0]},
        {"status": "ok", "kind": "throughput", "replicas": 2, "requests": 4, "seconds": 1.25, "requests_per_s": 3.2,
         "loadavg": [1.5, 1.0, 1.0]}],
        options={"model": "tiny", "conversations": 4, "turns": 2, "max_tokens": 2, "replicas": 2, "clients": 2,
                 "threads": 1, "memory_budget": "1MiB", "throughput_conversations": 2}),
    "serve-load": _synthetic("serve-load", [
        {"status": "ok", "mode": "load", "model": "tiny", "policy": policy, "budget": budget, "row_group": 4,
         "clients": clients, "requests": clients, "completion_tokens": 8 * clients, "wall_s": 1.0,
         "tokens_per_s": 8.0 * clients * speedup, "itl_p50_s": 0.01, "itl_p95_s": 0.02, "ttft_p50_s": 0.1,
         "ttft_p95_s": 0.2, "tpot_p50_s": 0.01, "tpot_p95_s": 0.02, "prompt_tokens_median": 40,
         "loadavg_before": [1.0, 1.0, 1.0], "loadavg_after": [1.5, 1.0, 1.0],
         "batching": {"mode": "batched", "mean_decode_rows": float(clients)}}
        for policy, budget, speedup in (("full", None, 1.0), ("window", 32, 0.5)) for clients in (1, 4)] + [
        {"status": "ok", "mode": "determinism", "model": "tiny", "policy": "full", "budget": None, "row_group": 1,
         "replies": 10, "differ": 3, "max_tokens": 8, "loadavg_before": [1.0, 1.0, 1.0],
         "loadavg_after": [2.5, 1.0, 1.0], "batching": {"mode": "batched"}, "examples": []}],
        options={"mode": "load", "models": ["tiny"], "max_tokens": 8, "requests": 1, "max_batch": 8, "threads": 1}),
    "kernel-rows": _synthetic("kernel-rows", [
        {"tokens": 256, "rows_per_kv_head": 3, "status": "ok", "dequantize_ms": 2.0, "kernel_ms": 1.0,
         "kernel_over_dequantize": 0.5, "fp32_attention_ms": 0.5}], {"kernel": {"available": True, "max_rows": 12}}),
}


@pytest.mark.parametrize("scenario", sorted(SYNTHETIC))
def test_renderers_on_synthetic_results(tmp_path, scenario):
    from kvbound.bench import report

    d = _write(tmp_path, scenario, SYNTHETIC[scenario])
    paths = report.render(d)
    text = (d / "report.md").read_text()
    assert paths[0] == d / "report.md" and text.startswith("# kvbound")
    assert "`kvbound bench --scenario" in text and "`abc123`" in text and "[2.0, 1.0, 1.0]" in text
    numbers = {"decode": "4.00×", "prefill": "0.75×", "recompute-error": "| yes |", "kernel-rows": "0.50",
               "quantization": "| `kivi:bits=4` | – | no | 10.500 | +5.00% | 0.25 | 0.250 | 50% | 2.00× |",
               "serve-parking": "budgeted / unbounded: 0.125×",
               "serve-load": "| tiny | window 32 | 4 | 4 | 16.0 | 4.00× |",
               "cluster": "Speed-up, 2 replicas / 1: 1.60x"}
    assert numbers[scenario] in text
    if scenario == "serve-load":
        assert (d / "throughput.png").stat().st_size > 0 and "](throughput.png)" in text
        assert "**3 / 10** greedy replies of 8 tokens differ" in text
    if scenario == "cluster":
        assert "Conversations lost: 1** of 4. First: APIError: 503" in text and "| r2 | 3 | 2 (1) | 256.0 MiB | 257.0 MiB" in text


def test_cluster_options_fail_before_anything_starts(tmp_path):
    """Bad ``cluster`` options are one-line errors before Ray, Redis or a model start."""
    for extra, match in ((["--memory-budget", "lots"], "memory size 'lots'"), (["--replicas", "0"], "--replicas"),
                         (["--policies", "window"], "policy full only")):
        args = _args(tmp_path, "--scenario", "cluster", *extra)
        with pytest.raises(KVBoundError, match=match):
            bench_cli.run(args)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra, match", [
    (["--client-levels", "1,x"], "--client-levels must be comma-separated whole numbers"),
    (["--row-groups", "0"], "--row-groups needs numbers >= 1"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--budgets", "0.5"], "one budget in tokens"),
    (["--mode", "determinism", "--policies", "full,window"], "one model and one policy"),
    (["--rounds", "0"], "--rounds must be >= 1"),
])
def test_serve_load_options_fail_before_anything_starts(tmp_path, extra, match):
    """Bad ``serve-load`` options are one-line errors before a server starts; good ones resolve."""
    with pytest.raises(KVBoundError, match=match) as err:
        bench_cli.run(_args(tmp_path, "--scenario", "serve-load", *extra))
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_serve_load_options_resolve():
    from kvbound.bench.scenarios import serve_load

    args = _args(Path("/nonexistent"), "--scenario", "serve-load", "--model", "a,b", "--policies", "full,window",
                 "--client-levels", "1,8", "--row-groups", "4")
    args.policy_list, args.budget_list, args.new_tokens = ["full", "window"], parse_budgets("32"), 32
    opts = serve_load.options(args)
    assert opts["models"] == ["a", "b"] and opts["policies"] == [["full", None], ["window", 32]]
    assert opts["client_levels"] == [1, 8] and opts["row_groups"] == [4] and opts["threads"] == 1


def test_serve_load_medians_take_each_rounds_own_baseline():
    """--rounds: each ratio is against the same round's 1-client level; the table shows the median (min-max)."""
    from kvbound.bench.scenarios.serve_load import _medians

    def level(round_, clients, tps, p95):
        return {"status": "ok", "mode": "load", "model": "m", "policy": "full", "budget": None, "row_group": 4,
                "round": round_, "clients": clients, "tokens_per_s": tps, "itl_p50_s": p95 / 2, "itl_p95_s": p95,
                "tpot_p50_s": clients / (2 * tps)}

    runs = [level(0, 1, 10.0, 0.10), level(0, 8, 30.0, 0.30), level(1, 1, 20.0, 0.20), level(1, 8, 40.0, 0.70),
            level(2, 1, 10.0, 0.10), level(2, 8, 35.0, 0.25)]
    lines = "\n".join(_medians(runs))
    # tokens/s ratios 3.0, 2.0, 3.5 -> median 3.0; ITL p95 ratios 3.0, 3.5, 2.5 -> median 3.0
    assert ("| m | full | 4 | 8 | 3 | 35.0 | 3.00× (2.00–3.50) | 70.0 | 3.00× (2.00–3.50) | 150 ms | 3.00× (2.50–3.50) "
            "| 300 ms | 3.00× (2.50–3.50) |") in lines
    assert _medians(runs[:2]) == []  # one round: no medians table


def test_report_all_writes_pages_plots_and_an_index(tmp_path):
    """``kvbound bench report --all ROOT --out DOCS``: a page per results.json, its plots beside it."""
    from kvbound.bench import report

    _write(tmp_path, "a/decode", SYNTHETIC["decode"])
    latency = _synthetic("latency", [{"tokens": 8, "batch": 1, "status": "ok", "kv_bytes": 10, "residual_bytes": 5,
                                      "read_seconds": 0.001, "recompute_seconds": 0.002, "recompute_over_read": 2.0}])
    _write(tmp_path, "lat", latency)
    args = _args(tmp_path, "report", "--all", str(tmp_path / "results"))
    args.out = str(tmp_path / "docs")
    assert bench_cli.run(args) == 0
    index = (tmp_path / "docs" / "index.md").read_text()
    assert "[a/decode](a/decode/index.md)" in index and "[lat](lat/index.md)" in index
    page = (tmp_path / "docs" / "lat" / "index.md").read_text()
    assert "![latency.png](latency.png)" in page and (tmp_path / "docs" / "lat" / "latency.png").stat().st_size > 1000
    assert not (tmp_path / "results" / "lat" / "report.md").exists()  # the sources are left alone
    one = _args(tmp_path, "report", str(tmp_path / "results" / "lat" / "results.json"))
    one.out = None  # beside the results.json
    assert bench_cli.run(one) == 0 and (tmp_path / "results" / "lat" / "report.md").exists()
    bad = _write(tmp_path, "bad", _synthetic("nope", []))
    with pytest.raises(KVBoundError, match="unknown scenario 'nope'"):
        report.render(bad)


# --------------------------------------------------------------------------- the scenarios from benchmarks/*.py


def test_decode_scenario_round_robin(tmp_path):
    args = _args(tmp_path, "--scenario", "decode", "--policies", "full,window,offload,kivi:bits=4", "--lengths", "160",
                 "--budgets", "32", "--max-new-tokens", "3", "--threads", "1")
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {r["policy"]: r for r in data["runs"]}
    assert list(runs) == ["full", "window", "offload", "kivi:bits=4"] and {r["status"] for r in runs.values()} == {"ok"}
    assert runs["offload"]["token_match"] == 1.0 and runs["offload"]["read_seconds_per_token"] > 0
    assert runs["window"]["peak_hot_kv_bytes"] < runs["full"]["peak_hot_kv_bytes"]
    assert runs["offload"]["time_ratio_vs_full"] == pytest.approx(
        runs["offload"]["seconds_per_token"] / runs["full"]["seconds_per_token"])
    assert all(r["steps"] == 3 and len(r["token_ids"]) == 3 for r in runs.values())
    assert data["meta"]["commit"] is None or len(data["meta"]["commit"]) >= 7
    assert "| 160 | `kivi:bits=4` |" in (tmp_path / "out" / "report.md").read_text()


def test_prefill_recompute_and_kernel_scenarios(tmp_path):
    args = _args(tmp_path, "--scenario", "prefill", "--lengths", "150", "--chunks", "0,40")
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [r["chunk"] for r in runs] == [None, 40] and runs[0]["first_tokens"] == runs[1]["first_tokens"]

    args = _args(tmp_path, "--scenario", "recompute-error", "--policies", "full,kv-direct,window", "--lengths", "140",
                 "--budgets", "16")
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert [(r["policy"], r["grouping"]) for r in runs] == [("kv-direct", "same rows"),
                                                            ("kv-direct", "prefix of a longer prefill")]
    assert runs[0]["rebuilt_layers"] > 0 and runs[0]["max_abs_dK"] < 1e-4

    args = _args(tmp_path, "--scenario", "kernel-rows", "--lengths", "64", "--rows", "1", "--repeats", "2")
    assert bench_cli.run(args) == 0
    run = json.loads((tmp_path / "out" / "results.json").read_text())["runs"][0]
    assert run["status"] == "ok" and run["dequantize_ms"] > 0 and run["fp32_attention_ms"] > 0


def test_quantization_scenario(tmp_path):
    args = _args(tmp_path, "--scenario", "quantization", "--policies", "full,kivi:bits=4,offload:codec=int8",
                 "--budgets", "32", "--max-tokens", "150", "--max-new-tokens", "3")
    assert bench_cli.run(args, model_and_tokenizer=_tiny()) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    ppl = {r["policy"]: r for r in data["runs"] if r["stage"] == "perplexity"}
    dec = {r["policy"]: r for r in data["runs"] if r["stage"] == "decode"}
    assert list(ppl) == list(dec) == ["full", "kivi:bits=4", "offload:codec=int8"]
    assert ppl["offload:codec=int8"]["exact"] is False and ppl["full"]["exact"] is True  # the codec makes it lossy
    assert ppl["kivi:bits=4"]["total_cache_bytes"] < ppl["full"]["total_cache_bytes"]
    assert dec["kivi:bits=4"]["time_ratio_vs_ref"] == pytest.approx(
        dec["kivi:bits=4"]["seconds_per_token"] / dec["full"]["seconds_per_token"])
    assert "| `offload:codec=int8` | 32 | no |" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.long
def test_serve_parking_scenario(tmp_path):
    """Two real server processes (tiny model): every reply identical, the budgeted one parks."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    args = _args(tmp_path, "--scenario", "serve-parking", "--model", "tiny-llama", "--conversations", "2", "--turns",
                 "2", "--max-new-tokens", "2", "--threads", "1")
    assert bench_cli.run(args) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    hot, parked = data["runs"]
    assert hot["label"] == "unbounded" and parked["stats"]["parks"] > 0
    assert data["extra"]["summary"]["identical_replies"] == data["extra"]["summary"]["replies"] == 4


@pytest.mark.long
def test_serve_load_scenario(tmp_path):
    """Real server processes (tiny model): a load level per client count, then greedy determinism."""
    pytest.importorskip("uvicorn")
    pytest.importorskip("openai")
    common = ("--scenario", "serve-load", "--model", "tiny-llama", "--max-new-tokens", "3", "--threads", "1")
    assert bench_cli.run(_args(tmp_path, *common, "--client-levels", "1,2", "--row-groups", "4")) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["clients"], r["row_group"], r["status"]) for r in data["runs"]] == [(1, 4, "ok"), (2, 4, "ok")]
    assert data["runs"][1]["completion_tokens"] > 0 and (tmp_path / "out" / "throughput.png").exists()
    det = tmp_path / "det"
    assert bench_cli.run(_args(tmp_path, *common, "--mode", "determinism", "--replies", "4", "--row-groups", "4",
                               "--out", str(det))) == 0
    (run,) = json.loads((det / "results.json").read_text())["runs"]
    assert run["differ"] == 0 and run["replies"] == 4 and "**0 / 4**" in (det / "report.md").read_text()


@pytest.mark.long
def test_cluster_scenario(tmp_path):
    """Ray Serve with 2 tiny replicas and a real Redis, one killed halfway: nothing lost, replies identical."""
    for module in ("ray", "redis", "openai", "uvicorn"):
        pytest.importorskip(module)
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    args = _args(tmp_path, "--scenario", "cluster", "--model", "tiny-llama", "--conversations", "4", "--turns", "2",
                 "--max-new-tokens", "2", "--clients", "2", "--throughput-conversations", "2")
    assert bench_cli.run(args) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [r["kind"] for r in data["runs"]] == ["reference", "failover", "throughput", "throughput"]
    failover = data["runs"][1]
    assert failover["conversations_lost"] == 0 and failover["replies_identical"] == 8
    assert failover["killed"]["at_request"] >= 4
    assert "Speed-up, 2 replicas / 1" in (tmp_path / "out" / "report.md").read_text()


def test_meta_command_names_kvbound_when_run_as_a_module():
    """``python3 -m kvbound.cli bench ...`` records ``kvbound bench ...``, as the entry point does;
    another script keeps its own name."""
    from kvbound.bench.results import program

    assert program("/x/site-packages/kvbound/cli/__main__.py") == "kvbound"
    assert program("/usr/local/bin/kvbound") == "kvbound"
    assert program("/x/tools/__main__.py") == "__main__.py"
    assert program("/x/run_bench.py") == "run_bench.py"
