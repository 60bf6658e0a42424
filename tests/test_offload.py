"""offload: exact output, bounded hot memory, the store's files and errors."""

import errno
import functools
import gc
import os
import subprocess
import sys

import pytest
import torch

import kvbound
from kvbound.errors import KVBoundError
from conftest import FAMILIES, prompt_ids, run_greedy, tiny

PROMPT, NEW = 16, 12


@functools.lru_cache(maxsize=None)
def full_greedy(name: str) -> list[int]:
    model = tiny(name)
    return run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "full"), NEW)


@pytest.mark.parametrize("budget", [1, 7, PROMPT // 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_offload_greedy_matches_full(name, budget):
    model = tiny(name)
    cache = kvbound.make_cache(model, "offload", budget=budget)
    assert run_greedy(model, prompt_ids(PROMPT), cache, NEW) == full_greedy(name)
    tiers = cache.bytes_by_tier()
    assert tiers["offloaded"] > 0 and cache.peak_transient_bytes > 0
    cache.close()


def test_host_store_matches_full():
    model = tiny("tiny-gemma3")
    cache = kvbound.make_cache(model, "offload", budget=3, store="host")
    assert cache.folder is None
    assert run_greedy(model, prompt_ids(PROMPT), cache, NEW) == full_greedy("tiny-gemma3")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_hot_bytes_within_budget_every_step(name):
    model, budget = tiny(name), 5
    cache = kvbound.make_cache(model, "offload", budget=budget)
    full = kvbound.make_cache(model, "full")
    per_layer_token = cache.kv_bytes_per_token // cache.num_layers
    ids = prompt_ids(12)
    with torch.no_grad():
        out, ref = model(ids, past_key_values=cache), model(ids, past_key_values=full)
        for _ in range(8):
            # exact up to float summation order (tiered attention merges blocks by log-sum-exp)
            torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
            nxt = ref.logits[:, -1:].argmax(-1)
            out, ref = model(nxt, past_key_values=cache), model(nxt, past_key_values=full)
            tiers = cache.bytes_by_tier()
            assert tiers["hot_kv"] <= budget * cache.kv_bytes_per_token
            assert all(layer.held() <= budget for layer in cache.layers)
            # every full-attention layer stores exactly the tokens that are not hot
            stored = sum(layer.store.nbytes() for layer in cache.layers if layer.sliding_window is None)
            expected = sum((layer.seen - layer.held()) * per_layer_token
                           for layer in cache.layers if layer.sliding_window is None)
            assert stored == expected
    assert cache.memory_report()["peak_hot_kv_bytes"] <= budget * cache.kv_bytes_per_token
    cache.close()


@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-gemma3"])
@pytest.mark.parametrize("drop", [2, 9])
def test_truncate_then_continue_matches_full(name, drop):
    model, ids = tiny(name), prompt_ids(20)
    cache = kvbound.make_cache(model, "offload", budget=4)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        cache.truncate(drop)
        assert cache.get_seq_length() == 20 - drop
        got = model(ids[:, 20 - drop:], past_key_values=cache).logits
        ref = model(ids, past_key_values=kvbound.make_cache(model, "full")).logits[:, 20 - drop:]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert got.argmax(-1).tolist() == ref.argmax(-1).tolist()
    cache.close()


def test_sliding_rollback_beyond_store_is_refused():
    model = tiny("tiny-gemma3")  # sliding window 6
    cache = kvbound.make_cache(model, "offload", budget=2, max_rollback=0)
    with torch.no_grad():
        model(prompt_ids(20), past_key_values=cache)
    with pytest.raises(KVBoundError, match="max_rollback"):
        cache.truncate(6)


def test_files_deleted_on_close_and_caches_never_share(tmp_path):
    model = tiny("tiny-llama")
    a = kvbound.make_cache(model, "offload", budget=2, dir=str(tmp_path))
    b = kvbound.make_cache(model, "offload", budget=2, dir=str(tmp_path))
    with torch.no_grad():
        model(prompt_ids(10), past_key_values=a)
        model(prompt_ids(10, seed=2), past_key_values=b)
    assert a.folder != b.folder and os.path.dirname(a.folder) == str(tmp_path)
    files_a = set(os.listdir(a.folder))
    assert len(files_a) == a.num_layers
    a.close()
    assert not os.path.exists(a.folder) and os.path.isdir(b.folder)
    a.close()  # idempotent
    with pytest.raises(KVBoundError, match="closed"):
        with torch.no_grad():
            model(prompt_ids(1), past_key_values=a)
    folder_b = b.folder
    del b
    gc.collect()
    assert not os.path.exists(folder_b)


def test_files_deleted_on_ctrl_c(tmp_path):
    code = (
        "import torch, kvbound\n"
        "from kvbound.tiny import build_tiny\n"
        "m = build_tiny('tiny-llama')\n"
        f"c = kvbound.make_cache(m, 'offload', budget=2, dir={str(tmp_path)!r})\n"
        "with torch.no_grad(): m(torch.arange(3, 13)[None], past_key_values=c)\n"
        "print(c.folder, flush=True)\n"
        "raise KeyboardInterrupt\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "KeyboardInterrupt" in proc.stderr
    folder = proc.stdout.strip()
    assert folder.startswith(str(tmp_path)) and not os.path.exists(folder)
    assert os.listdir(tmp_path) == []


def test_unwritable_dir_is_a_clear_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(KVBoundError, match="not a writable folder"):
        kvbound.make_cache(tiny("tiny-llama"), "offload", budget=2, dir=str(not_a_dir))
    with pytest.raises(KVBoundError, match="not a writable folder"):
        kvbound.make_cache(tiny("tiny-llama"), "offload", budget=2, dir=str(tmp_path / "missing"))


def test_full_disk_is_a_clear_error(monkeypatch):
    def no_space(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "offload", budget=2)
    with pytest.raises(KVBoundError, match="out of disk space"):
        with torch.no_grad():
            model(prompt_ids(10), past_key_values=cache)
    cache.close()


def test_bad_options():
    model = tiny("tiny-llama")
    with pytest.raises(KVBoundError, match="store must be one of"):
        kvbound.make_cache(model, "offload", budget=2, store="cloud")
    with pytest.raises(KVBoundError, match="read must be one of"):
        kvbound.make_cache(model, "offload", budget=2, read="stream")
    with pytest.raises(KVBoundError, match="unknown option"):
        kvbound.make_cache(model, "offload", budget=2, folder="/tmp")
    with pytest.raises(KVBoundError, match="needs a budget"):
        kvbound.make_cache(model, "offload")
