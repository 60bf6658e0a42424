import pytest
import torch

import kvbound
from conftest import FAMILIES, prompt_ids, run_greedy, tiny


@pytest.mark.parametrize("name", FAMILIES)
def test_window_keeps_last_budget_tokens(name):
    model = tiny(name)
    ids = prompt_ids(20)
    full = kvbound.make_cache(model, "full")
    win = kvbound.make_cache(model, "window", budget=7)
    with torch.no_grad():
        model(ids, past_key_values=full)
        model(ids, past_key_values=win)
    for lf, lw in zip(full.layers, win.layers):
        n = lw.keys.shape[-2]
        assert n == (7 if lw.sliding_window is None else min(7, lw.sliding_window - 1))
        assert torch.equal(lw.keys, lf.keys[..., -n:, :])
        assert torch.equal(lw.values, lf.values[..., -n:, :])
    assert win.get_seq_length() == 20


@pytest.mark.parametrize("name", FAMILIES)
def test_window_budget_respected_every_step(name):
    model = tiny(name)
    budget = 5
    cache = kvbound.make_cache(model, "window", budget=budget)
    ids = prompt_ids(12)
    per_token = cache.kv_bytes_per_token
    with torch.no_grad():
        out = model(ids, past_key_values=cache)
        for _ in range(8):
            nxt = out.logits[:, -1:].argmax(-1)
            out = model(nxt, past_key_values=cache)
            held = cache.bytes_by_tier()["hot_kv"]
            assert held <= budget * per_token
            assert all(layer.keys.shape[-2] <= budget for layer in cache.layers)
    assert cache.memory_report()["peak_hot_kv_bytes"] <= (budget + 12) * per_token


@pytest.mark.parametrize("name", FAMILIES)
def test_window_budget_beyond_context_matches_full(name):
    model = tiny(name)
    ids = prompt_ids(15)
    assert run_greedy(model, ids, kvbound.make_cache(model, "window", budget=64), 20) == \
        run_greedy(model, ids, kvbound.make_cache(model, "full"), 20)
