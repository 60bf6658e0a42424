"""Storage of the ``residual`` policy: what it holds, and when it is smaller than the K/V.

Exactness of ``residual`` is tested with ``kv-direct`` in ``test_kv_direct.py``.
"""

import pytest
import torch

import kvbound
from conftest import prompt_ids, tiny
from kvbound.cache.base import nbytes

RESIDUAL_TIERS = ("checkpoints", "pending_residuals", "residual_slack")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def feed(model, cache, prompt: int, steps: int, batch: int = 1) -> int:
    with torch.no_grad():
        out = model(prompt_ids(prompt, batch=batch), past_key_values=cache)
        for _ in range(steps):
            out = model(out.logits[:, -1:].argmax(-1), past_key_values=cache)
    return prompt + steps


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mha"])
def test_tiers_are_the_real_buffers(name):
    model = tiny(name)
    budget, batch = 4, 2
    cache = kvbound.make_cache(model, "residual", budget=budget)
    seen = feed(model, cache, 13, 6, batch)
    d = model.config.hidden_size
    row = batch * d * 4  # float32 residual of one token, all rows of the batch
    tiers = cache.bytes_by_tier()
    layers = len(cache.layers)
    assert tiers["checkpoints"] == layers * (seen - budget) * row
    assert tiers["pending_residuals"] == layers * budget * row
    assert sum(tiers[t] for t in RESIDUAL_TIERS) == sum(nbytes(layer.store.buf) for layer in cache.layers)
    assert tiers["residual_slack"] <= sum(nbytes(layer.store.buf) for layer in cache.layers) // 4 + layers * 64 * row
    assert tiers["hot_kv"] == budget * cache.kv_bytes_per_token * batch


def test_sliding_layers_keep_only_their_window():
    model = tiny("tiny-gemma3")  # sliding window 6 on layers 0 and 2
    window = model.config.sliding_window
    small = kvbound.make_cache(model, "residual", budget=2)
    big = kvbound.make_cache(model, "residual", budget=window - 1)
    for cache in (small, big):
        seen = feed(model, cache, 20, 8)
    for ls, lb in zip(small.layers, big.layers):
        if ls.sliding_window is None:
            assert ls.store.n == lb.store.n == seen
        else:
            assert ls.store.n == window - 1  # only tokens attention can still reach
            assert lb.store.buf is None  # hot window covers the whole attention window: nothing to keep


def test_residual_pays_only_for_mha():
    """Per evicted token and layer: d numbers of residual vs 2 * kv_heads * head_dim of K/V."""
    per_token = {}
    for name in ("tiny-mha", "tiny-llama"):
        model = tiny(name)
        cache = kvbound.make_cache(model, "residual", budget=1)
        seen = feed(model, cache, 10, 1)
        per_token[name] = (cache.bytes_by_tier()["checkpoints"] / (seen - 1), cache.kv_bytes_per_token)
    ckpt, kv = per_token["tiny-mha"]  # d=64 vs 2*4*16=128 per layer
    assert ckpt == kv / 2
    ckpt, kv = per_token["tiny-llama"]  # GQA: d=64 vs 2*2*16=64 per layer, no saving
    assert ckpt == kv


def test_batch_size_change_is_refused():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "residual", budget=3)
    feed(model, cache, 6, 0)
    with pytest.raises(kvbound.KVBoundError, match="batch size changed"), torch.no_grad():
        model(prompt_ids(2, batch=2), past_key_values=cache)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-mha"])
def test_span_projected_in_lazy_blocks_matches_full(name, monkeypatch):
    """With 4-token projection blocks the evicted span reaches attention as several lazy blocks,
    each projected when attention reads it (never the whole span's K/V at once): same tokens as
    ``full``, and more projections than layers show the span was split."""
    import kvbound.cache.residual as residual
    from conftest import run_greedy

    monkeypatch.setattr(residual, "PROJECT_CHUNK", 4)
    model, ids = tiny(name), prompt_ids(20)
    expected = run_greedy(model, ids, kvbound.make_cache(model, "full"), 12)
    cache = kvbound.make_cache(model, "residual", budget=3)
    calls = []
    inner = cache.project
    cache.project = lambda layer, start, end: calls.append(end - start) or inner(layer, start, end)
    assert run_greedy(model, ids, cache, 12) == expected
    assert max(calls) <= 4 and len(calls) > 12 * len(cache.layers), calls[:20]
