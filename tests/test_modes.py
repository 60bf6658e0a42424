"""Every generate mode for every exact policy (issue 10): beam search, batch reordering, seeded
sampling, reset and crop. Each exact policy must give exactly what ``full`` gives, at a budget
where generated tokens leave the hot window; the list of policies comes from the registry."""

import os
from dataclasses import replace

import pytest
import torch

import kvbound
from conftest import FAMILIES, prompt_ids, run_greedy, tiny
from kvbound.cache import exact_policies, registry
from kvbound.errors import KVBoundError

EXACT = exact_policies()
BUDGET = 4  # prompt 10 + 10 new tokens: most of the context leaves the hot window
MODELS = ["tiny-llama", "tiny-gemma3"]  # full attention; sliding window 6 next to full layers


pytestmark = pytest.mark.usefixtures("single_thread")


def make(model, policy):
    return kvbound.make_cache(model, policy, None if policy == "full" else BUDGET)


def generate(model, policy, ids, **kw):
    cache = make(model, policy)
    try:
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                              max_new_tokens=10, pad_token_id=0, eos_token_id=None, **kw)
    finally:
        cache.close()


def test_every_exact_policy_is_covered():
    assert {"full", "kv-direct", "residual", "offload"} <= set(EXACT)
    assert all(registry.get_policy(p).beams for p in EXACT)  # all support beams: none refuses below


@pytest.mark.parametrize("budget", [1, 7])
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("policy", EXACT)
def test_greedy_matches_full(policy, name, budget):
    """The base promise, for every exact policy the registry lists (a new one is covered here)."""
    model, ids = tiny(name), prompt_ids(16, seed=2)
    cache = kvbound.make_cache(model, policy, None if policy == "full" else budget)
    assert run_greedy(model, ids, cache, 12) == run_greedy(model, ids, kvbound.make_cache(model, "full"), 12)
    cache.close()


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", EXACT)
def test_beam_search_matches_full(policy, name):
    model, ids = tiny(name), prompt_ids(10, seed=6)
    kw = dict(num_beams=3, num_return_sequences=3, do_sample=False)
    assert torch.equal(generate(model, policy, ids, **kw), generate(model, "full", ids, **kw))


@pytest.mark.parametrize("policy", EXACT)
def test_seeded_sampling_matches_full(policy):
    model, ids = tiny("tiny-llama"), prompt_ids(10, seed=7)
    outs = []
    for pol in (policy, "full"):
        torch.manual_seed(123)
        outs.append(generate(model, pol, ids, do_sample=True, top_k=0, top_p=1.0, temperature=1.5))
    assert torch.equal(*outs)


def _continue(model, cache, batch: int, steps: int = 6) -> torch.Tensor:
    """Greedy steps fed one token at a time on ``cache`` (no generate: the batch may have changed)."""
    out, nxt = [], prompt_ids(1, seed=9, batch=batch)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(nxt, past_key_values=cache).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            out.append(nxt)
    return torch.cat(out, dim=1)


BATCH_OPS = {
    "reorder_cache": lambda c: c.reorder_cache(torch.tensor([2, 0, 0])),
    "batch_select_indices": lambda c: c.batch_select_indices(torch.tensor([2, 0])),
    "batch_repeat_interleave": lambda c: c.batch_repeat_interleave(2),
}


@pytest.mark.parametrize("op", BATCH_OPS)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("policy", EXACT)
def test_batch_ops_match_full(policy, name, op):
    """Three sequences with different histories, mapped, then decoded: each row keeps its own past."""
    model, ids = tiny(name), prompt_ids(12, seed=8, batch=3)
    outs = []
    for pol in (policy, "full"):
        cache = make(model, pol)
        with torch.no_grad():
            model(ids, past_key_values=cache)
        BATCH_OPS[op](cache)
        rows = cache.layers[0].keys.shape[0]
        outs.append(_continue(model, cache, rows))
        cache.close()
    assert torch.equal(*outs)


@pytest.mark.parametrize("policy", EXACT)
def test_reset_is_a_new_cache(policy):
    model, ids = tiny("tiny-gemma3"), prompt_ids(12, seed=4)
    fresh = make(model, policy)
    first = kvbound.generation.greedy(model, ids, fresh, 8, stop_at_eos=False)
    report = fresh.memory_report()
    cache = make(model, policy)
    kvbound.generation.greedy(model, prompt_ids(15, seed=5), cache, 8, stop_at_eos=False)
    cache.reset()
    assert cache.get_seq_length() == 0 and all(layer.seen == 0 for layer in cache.layers)
    assert cache.peak_hot_kv_bytes == 0 and cache.peak_transient_bytes == 0
    assert cache.memory_report()["total_bytes"] == 0  # hot K/V, ids, residuals, offload stores
    if getattr(cache, "folder", None):
        assert os.listdir(cache.folder) == []  # offload files removed
    again = kvbound.generation.greedy(model, ids, cache, 8, stop_at_eos=False)
    assert torch.equal(again, first)
    assert cache.memory_report() == report  # peaks and tiers as a fresh cache's
    cache.close()
    fresh.close()


@pytest.mark.parametrize("policy", EXACT)
def test_crop_then_continue_matches_full(policy):
    model, ids = tiny("tiny-llama"), prompt_ids(10, seed=11)
    outs = []
    for pol in (policy, "full"):
        cache = make(model, pol)
        out = kvbound.generation.greedy(model, ids, cache, 8, stop_at_eos=False)
        cache.crop(-5)  # transformers' API: remove the last 5 tokens
        assert cache.get_seq_length() == ids.shape[1] + 7 - 5
        cache.crop(cache.get_seq_length() - 1)  # ... or keep that many
        kept = torch.cat([ids, out], dim=1)[:, :cache.get_seq_length() + 1]
        outs.append(kvbound.generation.greedy(model, kept, cache, 6, stop_at_eos=False))
        cache.close()
    assert torch.equal(*outs)


def test_policy_without_beams_refuses_reordering(monkeypatch):
    """A policy whose registry entry says beams=False refuses each batch op with one clear error."""
    model = tiny("tiny-llama")
    monkeypatch.setitem(registry._REGISTRY, "window", replace(registry.get_policy("window"), beams=False))
    cache = kvbound.make_cache(model, "window", BUDGET)
    with torch.no_grad():
        model(prompt_ids(6, batch=2), past_key_values=cache)
    for op in BATCH_OPS.values():
        with pytest.raises(KVBoundError, match="does not support .*beam search"):
            op(cache)
    with pytest.raises(KVBoundError, match="does not support"):
        model.generate(prompt_ids(6), past_key_values=kvbound.make_cache(model, "window", BUDGET),
                       num_beams=2, max_new_tokens=4, do_sample=False, pad_token_id=0)
