import torch
from transformers import DynamicCache

import kvbound
from kvbound.cache.base import nbytes
from kvbound.generation import greedy

from conftest import FAMILIES, prompt_ids, run_greedy, tiny
import pytest


@pytest.mark.parametrize("name", FAMILIES + ["tiny-gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_matches_dynamic_cache(name, attn):
    model = tiny(name, attn)
    ids = prompt_ids(23)
    ref = greedy(model, ids, DynamicCache(config=model.config), 24, stop_at_eos=False)
    out = greedy(model, ids, kvbound.make_cache(model, "full"), 24, stop_at_eos=False)
    assert torch.equal(ref, out)


@pytest.mark.parametrize("name", FAMILIES)
def test_memory_report_equals_tensor_bytes(name):
    model = tiny(name)
    cache = kvbound.make_cache(model, "full")
    run_greedy(model, prompt_ids(20), cache, 10)
    held = sum(nbytes(layer.keys, layer.values) for layer in cache.layers)
    report = cache.memory_report()
    assert report["bytes_by_tier"] == {"hot_kv": held}
    assert report["peak_hot_kv_bytes"] == held  # full cache only grows
    assert report["tokens_seen"] == 29  # 20 prompt + 10 generated - last token not yet fed back
    if name != "tiny-gemma3":  # every layer full attention: analytic bytes/token match
        assert held == report["kv_bytes_per_token"] * 29


@pytest.mark.parametrize("name", FAMILIES)
def test_multi_turn_reuse_matches_dynamic_cache(name):
    model = tiny(name)
    caches = {"ref": DynamicCache(config=model.config), "kv": kvbound.make_cache(model, "full")}
    outs = {}
    for key, cache in caches.items():
        ids = prompt_ids(12, seed=2)
        turns = []
        for turn in range(3):
            new = greedy(model, ids, cache, 6, stop_at_eos=False)
            turns.append(new)
            ids = torch.cat([ids, new, prompt_ids(5, seed=10 + turn)], dim=1)
        outs[key] = torch.cat(turns, dim=1)
        assert cache.get_seq_length() == ids.shape[1] - 5 - 1  # last reply token not fed back yet
    assert torch.equal(outs["ref"], outs["kv"])
