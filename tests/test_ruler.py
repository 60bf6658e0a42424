"""RULER scenario (issue 21): task generators, scoring, the compress API on the eviction layers, both
protocols end to end on tiny-llama, and the bad-input errors."""

import argparse
import json
import re

import pytest
import torch

import kvbound
from conftest import prompt_ids, tiny
from kvbound.bench import cli as bench_cli
from kvbound.cache.context import ContextRecorder
from kvbound.errors import KVBoundError
from kvbound.models import byte_tokenizer
from kvbound.quality import ruler_tasks as rt

pytestmark = pytest.mark.usefixtures("single_thread")

TOK = byte_tokenizer()


# --------------------------------------------------------------------------- generators and scoring


@pytest.mark.parametrize("task", rt.TASKS)
def test_samples_are_deterministic_fit_and_hold_their_answers(task):
    a, b = rt.make_sample(TOK, task, 1500, 0), rt.make_sample(TOK, task, 1500, 0)
    assert a == b
    assert rt.make_sample(TOK, task, 1500, 1).references != a.references
    assert a.tokens <= 1500 and a.tokens > 1200  # filled up to the length
    context = TOK.decode(list(a.context_ids))
    assert all(ref in context for ref in a.references)
    question = TOK.decode(list(a.question_ids))
    assert not any(ref in question for ref in a.references if task != "vt" or ref != a.references[0])


def test_first_sample_continues_the_numbering():
    """Samples K.. of a later run are those a longer run holds at the same indices (a board grows by merging)."""
    long_run = rt.make_samples(TOK, ["niah_single_1", "vt"], 600, 4)
    later = rt.make_samples(TOK, ["niah_single_1", "vt"], 600, 2, first=2)
    assert later == [s for s in long_run if s.index >= 2]
    assert [(s.task, s.index) for s in later] == [("niah_single_1", 2), ("niah_single_1", 3), ("vt", 2), ("vt", 3)]


def test_niah_needles_and_queries():
    s = rt.make_sample(TOK, "niah_multiquery", 1500, 0)
    context, question = TOK.decode(list(s.context_ids)), TOK.decode(list(s.question_ids))
    keys = re.findall(r"special magic numbers for (\S+) is: (\d+)\.", context)
    assert sorted(v for _, v in keys) == sorted(s.references) and len(keys) == 4
    assert all(k in question for k, _ in keys)
    mv = rt.make_sample(TOK, "niah_multivalue", 1500, 0)
    needles = re.findall(r"for (\S+) is: (\d+)\.", TOK.decode(list(mv.context_ids)))
    assert len({k for k, _ in needles}) == 1 and sorted(v for _, v in needles) == sorted(mv.references)
    uuid = rt.make_sample(TOK, "niah_multikey_3", 1500, 0)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", uuid.references[0])
    assert TOK.decode(list(uuid.context_ids)).count("One of the special magic uuids") > 5  # a haystack of needles


def test_vt_chain_is_in_order():
    s = rt.make_sample(TOK, "vt", 1500, 0)
    context = TOK.decode(list(s.context_ids))
    first = re.search(r"VAR (\w+) = (\d+)\.", context)
    assert first.group(1) == s.references[0] and first.group(2) in TOK.decode(list(s.question_ids))
    for prev, name in zip(s.references, s.references[1:]):
        assert context.index(f"VAR {prev} =") < context.index(f"VAR {name} = VAR {prev}.")


def test_cwe_and_fwe_answers_are_the_most_frequent():
    cwe = rt.make_sample(TOK, "cwe", 2000, 0)
    words = re.findall(r"\d+\. (\w+)", TOK.decode(list(cwe.context_ids)))
    counts = {w: words.count(w) for w in set(words)}
    assert min(counts[w] for w in cwe.references) > max(c for w, c in counts.items() if w not in cwe.references)
    fwe = rt.make_sample(TOK, "fwe", 2000, 0)
    coded = TOK.decode(list(fwe.context_ids)).split()
    top = sorted(set(coded), key=coded.count, reverse=True)
    assert top[0] == "..." and set(top[1:4]) == set(fwe.references)


def test_score_is_string_match_all():
    assert rt.score("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert rt.score("only 123", ["123", "456"]) == 0.5
    assert rt.score("ABCDE-x", ["abcde"]) == 1.0  # case-insensitive
    assert rt.score("", ["1"]) == 0.0
    with pytest.raises(KVBoundError):
        rt.score("x", [])


def test_too_short_and_unknown_task():
    with pytest.raises(KVBoundError, match="needs at least .* tokens"):
        rt.make_sample(TOK, "niah_single_1", 50, 0)
    with pytest.raises(KVBoundError, match="valid tasks: niah_single_1, .*fwe"):
        rt.make_sample(TOK, "qa_1", 1000, 0)


# --------------------------------------------------------------------------- the compress API


RAZOR = {"threshold": 0.0, "fraction": 0.34}  # random weights: every head qualifies at threshold 0


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "tova", "streaming", "keydiff", "knorm", "expected-attention",
                                    "kvzip", "razor"])
def test_compress_equals_one_prefill_step_of_the_policy(policy, kv_home):
    """Compressing the recorded context (prefilled in 4 chunks) keeps what the policy keeps after a
    one-pass prefill of the same context at budget ``keep`` (expected-attention: statistics of every
    context token's attention input; kvzip: one reconstruction of the whole context; razor: ragged
    heads and the compensation tokens); afterwards nothing more is evicted."""
    model, ids, keep = tiny("tiny-llama"), prompt_ids(80), 24
    options = RAZOR if policy == "razor" else {}
    context = ContextRecorder(model, inputs=policy == "expected-attention")
    ref = kvbound.make_cache(model, policy, keep, **options)
    with torch.no_grad():
        kvbound.generation.prefill(model, ids, context, 20)
        model(ids, past_key_values=ref)
    cache = kvbound.make_cache(model, policy, keep, **options)
    cache.compress(context, keep)
    for mine, theirs in zip(cache.layers, ref.layers):
        assert torch.equal(mine.positions, theirs.positions)
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 80
    kept = [sum(layer.kept_per_head()) for layer in cache.layers]
    assert sum(kept) == len(kept) * cache.kv_heads * keep  # heads x budget (razor: spread over the heads)
    with torch.no_grad():
        model(prompt_ids(5, seed=3), past_key_values=cache)
    assert [sum(layer.kept_per_head()) for layer in cache.layers] == [k + 5 * cache.kv_heads for k in kept]


@torch.no_grad()
def test_razor_compressed_context_keeps_its_compensation_tokens_weighted(kv_home):
    """After compress, every later step still sees each compensation token as ``m`` tokens (``log m``
    on its logit): the question's logits equal those of razor's own one-pass prefill (which merges
    only after that step's attention), and a step after the question equals the two fed at once;
    the recorder's shared K/V are left untouched by the merge."""
    model, ids, keep = tiny("tiny-llama"), prompt_ids(80), 24
    question, more = prompt_ids(5, seed=3), prompt_ids(1, seed=4)
    context = ContextRecorder(model)
    kvbound.generation.prefill(model, ids, context, 20)
    before = [k.clone() for k, *_ in context.recorded()]
    ref = kvbound.make_cache(model, "razor", keep, **RAZOR)
    model(ids, past_key_values=ref)
    caches = []
    for _ in range(2):
        cache = kvbound.make_cache(model, "razor", keep, **RAZOR)
        cache.compress(context, keep)
        caches.append(cache)
    assert any(float(layer.weight.max()) > 1 for layer in caches[0].layers)  # compensation tokens are held
    torch.testing.assert_close(model(question, past_key_values=caches[0]).logits,
                               model(question, past_key_values=ref).logits, rtol=1e-4, atol=1e-5)
    apart = model(more, past_key_values=caches[0]).logits[:, -1]
    together = model(torch.cat([question, more], dim=1), past_key_values=caches[1]).logits[:, -1]
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(k, b) for (k, *_), b in zip(context.recorded(), before))
    with pytest.raises(KVBoundError, match="razor compresses to its budget \\(24 tokens per KV head\\), got keep 12"):
        kvbound.make_cache(model, "razor", keep, **RAZOR).compress(context, 12)


def test_compress_refuses_missing_queries():
    model = tiny("tiny-llama")
    context = ContextRecorder(model, window=4)
    with torch.no_grad():
        kvbound.generation.prefill(model, prompt_ids(60), context, 20)
    with pytest.raises(KVBoundError, match="snapkv cannot compress .* last 4 tokens: it scores with 32"):
        kvbound.make_cache(model, "snapkv", 16).compress(context, 16)
    with pytest.raises(KVBoundError, match="expected-attention compresses a prefilled context from its attention inputs"):
        kvbound.make_cache(model, "expected-attention", 16).compress(context, 16)


def test_kvzip_scores_the_context_once_for_every_ratio():
    model = tiny("tiny-llama")
    context = ContextRecorder(model)
    with torch.no_grad():
        kvbound.generation.prefill(model, prompt_ids(60), context, 20)
    first = kvbound.make_cache(model, "kvzip", 30)
    first.compress(context, 30)
    scores = context.shared["kvzip"]
    second = kvbound.make_cache(model, "kvzip", 10)
    second.compress(context, 10)
    assert context.shared["kvzip"] is scores and second.reconstructed_tokens == 0 < first.reconstructed_tokens
    for a, b in zip(first.layers, second.layers):  # the 10 best are among the 30 best
        assert set(b.positions[0, 0].tolist()) <= set(a.positions[0, 0].tolist())


# --------------------------------------------------------------------------- the scenario


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    """The ruler scenario's arguments, in float32 unless ``extra`` names a dtype: the scenario's default is
    bfloat16, and these tests compare bits (batched vs alone) and float32 byte counts."""
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    dtype = [] if "--dtype" in extra else ["--dtype", "float32"]
    return parser.parse_args(["--scenario", "ruler", "--out", str(tmp_path / "out"), "--no-progress", *dtype, *extra])


def test_ruler_runs_in_bfloat16_by_default(tmp_path):
    """Without --dtype the ruler scenario runs the model (and every policy) in bfloat16, as the field's
    leaderboards do: 2 bytes per held K/V value."""
    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    args = parser.parse_args(["--scenario", "ruler", "--out", str(tmp_path / "out"), "--no-progress", "--model",
                              "tiny-llama", "--lengths", "500", "--tasks", "niah_single_1", "--ratios", "0.5",
                              "--samples", "1", "--policies", "full,snapkv", "--max-new-tokens", "3"])
    model = tiny("tiny-llama")
    assert bench_cli.run(args, model_and_tokenizer=(model, TOK)) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["meta"]["options"]["dtype"] == "bfloat16" and data["meta"]["model"]["dtype"] == "bfloat16"
    assert model.dtype == torch.bfloat16
    assert all(r["status"] == "ok" for r in data["runs"])
    assert {r["held_kv_bytes"] for r in data["runs"] if r["policy"] == "snapkv"} == {
        2 * 2 * r["keep"] * model.config.num_hidden_layers * model.config.num_key_value_heads
        * (model.config.hidden_size // model.config.num_attention_heads)
        for r in data["runs"] if r["policy"] == "snapkv"}  # 2 bytes per value


def test_a_later_run_extends_a_board_by_merge(tmp_path):
    """``--first-sample 1`` scores sample 1 only; merged with a run of sample 0, the board holds both once."""
    from kvbound.bench import merge

    common = ("--model", "tiny-llama", "--lengths", "400", "--tasks", "niah_single_1", "--ratios", "0.5",
              "--samples", "1", "--policies", "full,snapkv", "--max-new-tokens", "2")
    model = tiny("tiny-llama")
    for name, first in (("a", "0"), ("b", "1")):
        args = _args(tmp_path / name, *common, "--first-sample", first)
        assert bench_cli.run(args, model_and_tokenizer=(model, TOK)) == 0
    later = json.loads((tmp_path / "b" / "out" / "results.json").read_text())
    assert {r["sample"] for r in later["runs"]} == {1} and later["meta"]["options"]["first_sample"] == 1
    merge.merge(tmp_path / "m", [tmp_path / "a" / "out", tmp_path / "b" / "out"])
    runs = json.loads((tmp_path / "m" / "results.json").read_text())["runs"]
    assert sorted((r["sample"], r["policy"]) for r in runs) == [(0, "full"), (0, "snapkv"), (1, "full"), (1, "snapkv")]


@pytest.mark.parametrize("protocol", ["compress", "bounded"])
def test_protocols_end_to_end(tmp_path, protocol):
    args = _args(tmp_path, "--protocol", protocol, "--model", "tiny-llama", "--lengths", "500",
                 "--tasks", "niah_single_1,vt", "--ratios", "0.5,0.875", "--samples", "1",
                 "--policies", "full,snapkv,streaming,offload", "--max-new-tokens", "3", "--prefill-chunk", "64")
    model = tiny("tiny-llama")
    assert bench_cli.run(args, model_and_tokenizer=(model, TOK)) == 0
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = data["runs"]
    assert all(r["status"] == "ok" for r in runs)
    scored = {(r["task"], r["policy"], r["ratio"]) for r in runs if r.get("role") is None}
    assert scored == {(t, p, q) for t in ("niah_single_1", "vt") for p in ("snapkv", "streaming") for q in (0.5, 0.875)} \
        | {(t, "full", None) for t in ("niah_single_1", "vt")}
    for r in runs:
        assert 0.0 <= r["score"] <= 1.0 and len(r["answer_tokens"]) <= 3
        if r["ratio"] is not None:
            assert r["keep"] == round((1 - r["ratio"]) * r["context_tokens"])
            assert r["held_kv_bytes"] <= r["keep"] * 2 * 2 * 4 * 16 * model.config.num_hidden_layers  # K+V fp32
    exact = [r for r in runs if r.get("role") == "exact check"]
    assert [r["policy"] for r in exact] == ["offload", "offload"] and all(r["identical_to_full"] for r in exact)
    assert (protocol == "compress") == bool(data["extra"].get("shared_prefills"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "`full` (ceiling)" in report and (tmp_path / "out" / "ruler_score_vs_ratio.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--tasks", "niah_single_1,qa_2"], r"unknown RULER task 'qa_2'; valid tasks: niah_single_1, .*, fwe"),
    (["--lengths", "5000"], r"--lengths 5000 is past the model's 1024 positions"),
    (["--ratios", "0.5,1"], r"--ratios must be fractions in \[0, 1\)"),
    (["--ratios", "-0.1"], r"--ratios must be fractions in \[0, 1\)"),
    (["--policies", "kivi"], r"policy 'kivi' cannot run --protocol compress .* it supports --protocol bounded"),
    (["--samples", "0"], r"--samples must be >= 1"),
    (["--first-sample", "-1"], r"--first-sample must be >= 0, got -1"),
])
def test_bad_input(tmp_path, extra, message):
    args = _args(tmp_path, "--model", "tiny-llama", *extra)
    with pytest.raises(KVBoundError, match=message) as err:
        bench_cli.run(args, model_and_tokenizer=(tiny("tiny-llama"), TOK))
    assert "\n" not in str(err.value)
    results = tmp_path / "out" / "results.json"  # the length check needs the model: it runs after the folder exists
    assert not results.exists() or not json.loads(results.read_text())["runs"]


def test_compress_at_ratio_zero_answers_as_full(tmp_path):
    """Nothing evicted: the question appended after a compressed copy gets full's answer (positions,
    masks and the uncompressed question are right)."""
    args = _args(tmp_path, "--model", "tiny-llama", "--lengths", "500", "--tasks", "niah_single_2", "--ratios", "0",
                 "--samples", "1", "--policies", "full,snapkv,h2o,tova,streaming", "--max-new-tokens", "6",
                 "--prefill-chunk", "64")
    assert bench_cli.run(args, model_and_tokenizer=(tiny("tiny-llama"), TOK)) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    full = next(r["answer_tokens"] for r in runs if r["policy"] == "full")
    assert len(runs) == 5 and all(r["answer_tokens"] == full for r in runs)


def test_policy_variants_with_options_run_at_the_same_bytes(tmp_path):
    """``snapkv:allocation=ada`` in the leaderboard: its own per-head budgets, the same K/V bytes as
    uniform ``snapkv`` at every ratio (both protocols share the variant syntax)."""
    args = _args(tmp_path, "--protocol", "compress", "--model", "tiny-llama", "--lengths", "500",
                 "--tasks", "niah_single_1", "--ratios", "0.5,0.875", "--samples", "1",
                 "--policies", "full,snapkv,snapkv:allocation=ada", "--max-new-tokens", "3", "--prefill-chunk", "64")
    assert bench_cli.run(args, model_and_tokenizer=(tiny("tiny-llama"), TOK)) == 0
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert all(r["status"] == "ok" for r in runs)
    held = {(r["policy"], r["ratio"]): r["held_kv_bytes"] for r in runs if r["ratio"] is not None}
    assert set(held) == {(p, q) for p in ("snapkv", "snapkv:allocation=ada") for q in (0.5, 0.875)}
    for q in (0.5, 0.875):
        assert held[("snapkv:allocation=ada", q)] == held[("snapkv", q)] > 0


def test_batched_answers_equal_answers_alone(tmp_path, kv_home):
    """--answers batched (the compress default) gives every cell the answer it gets alone; the
    batched records say how many rows shared the passes."""
    common = ["--model", "tiny-llama", "--lengths", "500", "--tasks", "niah_single_1,vt", "--ratios", "0.5,0.875",
              "--samples", "1", "--policies", "full,snapkv,h2o,streaming,keydiff,knorm,expected-attention,kvzip,kvzip:allocation=ada,"
              "razor:threshold=0,fraction=0.34",
              "--max-new-tokens", "5", "--prefill-chunk", "64"]
    answers = {}
    for mode in ("batched", "alone"):
        args = _args(tmp_path / mode, *common, "--answers", mode)
        assert bench_cli.run(args, model_and_tokenizer=(tiny("tiny-llama"), TOK)) == 0
        data = json.loads((tmp_path / mode / "out" / "results.json").read_text())
        assert all(r["status"] == "ok" for r in data["runs"])
        answers[mode] = {(r["task"], r["policy"], r["ratio"]): r["answer_tokens"] for r in data["runs"]}
        held = {(r["task"], r["policy"], r["ratio"]): r["held_kv_bytes"] for r in data["runs"] if r["ratio"]}
        for task, policy, ratio in held:  # kvzip's ragged ada heads hold what its uniform heads hold
            if policy == "kvzip":
                assert held[(task, "kvzip:allocation=ada", ratio)] == held[(task, policy, ratio)] > 0
        rows = [r.get("answered_with") for r in data["runs"] if r["ratio"] is not None]
        if mode == "batched":  # every compressed copy batches, even a policy whose hooks observe its inputs
            assert min(rows) > 1 and data["extra"]["answer_batches"]
            assert "Answer batches: " in (tmp_path / mode / "out" / "report.md").read_text()
        else:
            assert not any(rows) and "answer_batches" not in data["extra"]
    assert answers["batched"] == answers["alone"]


def test_greedy_rows_stop_at_eos_and_refuse_empty_prompts():
    from kvbound.batching import greedy_rows

    model = tiny("tiny-llama")
    caches = [kvbound.make_cache(model, "full") for _ in range(2)]
    ids = prompt_ids(12)[0].tolist()
    free = greedy_rows(model, caches, [ids, ids[:7]], [6, 6])
    eos = free[0][2]
    caches = [kvbound.make_cache(model, "full") for _ in range(2)]
    stopped = greedy_rows(model, caches, [ids, ids[:7]], [6, 6], eos=[eos])
    assert stopped[0] == free[0][:free[0].index(eos) + 1]
    assert stopped[1] == (free[1][:free[1].index(eos) + 1] if eos in free[1] else free[1])
    with pytest.raises(ValueError, match="at least one prompt token"):
        greedy_rows(model, [kvbound.make_cache(model, "full")], [[]], [3])
