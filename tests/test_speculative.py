"""Self-speculative exact decoding: token-identical to greedy with the full cache."""

import functools

import pytest
import torch

import kvbound
from kvbound.errors import KVBoundError
from kvbound.speculative import speculative_greedy
from conftest import FAMILIES, prompt_ids, run_greedy, tiny

PROMPT, NEW = 16, 8


@functools.lru_cache(maxsize=None)
def full_greedy(name: str, n: int = NEW) -> list[int]:
    model = tiny(name)
    return run_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "full"), n)


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("budget", [1, 7, PROMPT // 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_offload_speculation_matches_full(name, budget, k):
    model = tiny(name)
    cache = kvbound.make_cache(model, "offload", budget=budget)
    draft = "window" if budget == 1 else "streaming"  # streaming needs budget > its 4 sinks
    new, stats = speculative_greedy(model, prompt_ids(PROMPT), cache, draft=draft, k=k, max_new_tokens=NEW)
    assert new[0].tolist() == full_greedy(name)
    # the exact cache ends as after generate(): prompt + all new tokens but the last
    assert cache.get_seq_length() == PROMPT + NEW - 1
    per_token = cache.kv_bytes_per_token
    assert cache.peak_hot_kv_bytes <= budget * per_token  # after every forward pass
    assert stats.draft_peak_hot_kv_bytes <= budget * per_token
    assert stats.new_tokens == NEW and 0 <= stats.accepted <= stats.drafted <= k * stats.verifications
    cache.close()


@pytest.mark.parametrize("policy", ["kv-direct", "residual"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_recomputing_speculation_matches_full(name, policy):
    model = tiny(name)
    for budget, k in [(1, 8), (7, 4)]:
        cache = kvbound.make_cache(model, policy, budget=budget)
        new, _ = speculative_greedy(model, prompt_ids(PROMPT), cache, draft="window", k=k, max_new_tokens=NEW)
        assert new[0].tolist() == full_greedy(name)


def test_kv_direct_speculation_matches_full_on_sliding_layers():
    model = tiny("tiny-gemma3")
    cache = kvbound.make_cache(model, "kv-direct", budget=2)
    new, _ = speculative_greedy(model, prompt_ids(PROMPT), cache, draft="window", k=4, max_new_tokens=NEW)
    assert new[0].tolist() == full_greedy("tiny-gemma3")
    with pytest.raises(KVBoundError, match="cannot roll back"):  # residuals outside the window are gone
        speculative_greedy(model, prompt_ids(PROMPT), kvbound.make_cache(model, "residual", budget=2),
                           draft="window", k=4, max_new_tokens=NEW)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mha"])
def test_drafts_accepted_when_draft_sees_everything(name):
    """A draft window covering the whole context drafts the exact tokens: all accepted."""
    model, k = tiny(name), 4
    cache = kvbound.make_cache(model, "full")
    new, stats = speculative_greedy(model, prompt_ids(PROMPT), cache, budget=64, k=k, max_new_tokens=NEW)
    assert new[0].tolist() == full_greedy(name)
    # 1 token from the prefill, then rounds of k drafts + 1 exact token
    assert stats.verifications == -(-(NEW - 1) // (k + 1))
    assert stats.accepted == NEW - 1 - stats.verifications
    assert stats.mean_accepted > 0 and stats.min_margin > 0


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_eos_stops_like_greedy(name):
    model, ref = tiny(name), full_greedy(name)
    eos = ref[5]
    cache = kvbound.make_cache(model, "offload", budget=6)
    new, _ = speculative_greedy(model, prompt_ids(PROMPT), cache, k=4, max_new_tokens=NEW, eos_token_id=[eos, 999])
    expected = ref[: ref.index(eos) + 1]
    assert new[0].tolist() == expected
    assert cache.get_seq_length() == PROMPT + len(expected) - 1


def test_continues_a_conversation_on_the_same_cache():
    model = tiny("tiny-llama")
    ids = prompt_ids(PROMPT)
    cache = kvbound.make_cache(model, "offload", budget=6)
    first, _ = speculative_greedy(model, ids[:, :10], cache, k=3, max_new_tokens=5)
    full = kvbound.make_cache(model, "full")
    ref_first = run_greedy(model, ids[:, :10], full, 5)
    assert first[0].tolist() == ref_first
    turn2 = torch.cat([ids[:, :10], first, ids[:, 10:]], dim=1)
    second, _ = speculative_greedy(model, turn2, cache, k=3, max_new_tokens=6)
    assert second[0].tolist() == run_greedy(model, turn2, full, 6)


def test_refusals():
    model = tiny("tiny-llama")
    ids = prompt_ids(8)
    cache = kvbound.make_cache(model, "offload", budget=4)
    with pytest.raises(KVBoundError, match="greedy only"):
        speculative_greedy(model, ids, cache, do_sample=True)
    with pytest.raises(KVBoundError, match="batch size 1"):
        speculative_greedy(model, prompt_ids(8, batch=2), cache)
    with pytest.raises(KVBoundError, match=">= 1"):
        speculative_greedy(model, ids, cache, k=0)
    with pytest.raises(KVBoundError, match="exact cache"):
        speculative_greedy(model, ids, kvbound.make_cache(model, "window", budget=4))
    with pytest.raises(KVBoundError, match="must be lossy"):
        speculative_greedy(model, ids, cache, draft="full")
    with pytest.raises(KVBoundError, match="unknown policy"):
        speculative_greedy(model, ids, cache, draft="nope")
    with pytest.raises(KVBoundError, match="cannot restart .* valid drafts: .*streaming"):
        speculative_greedy(model, ids, kvbound.make_cache(model, "offload", budget=8), draft="h2o")
    with pytest.raises(KVBoundError, match="needs a budget"):
        speculative_greedy(model, ids, kvbound.make_cache(model, "full"))


def test_lossy_cache_cannot_roll_back():
    model = tiny("tiny-gemma3")
    cache = kvbound.make_cache(model, "full")
    with torch.no_grad():
        model(prompt_ids(12), past_key_values=cache)  # past the sliding window of 6
    with pytest.raises(KVBoundError, match="cannot roll back"):
        cache.truncate(2)
    with pytest.raises(KVBoundError, match="can truncate"):
        kvbound.make_cache(model, "offload", budget=2).truncate(1)


@pytest.mark.slow
def test_smollm2_offload_speculation_matches_full_100_tokens():
    from kvbound.models import load

    model, tokenizer = load("smollm2-135m")
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
            "combined movable metal type, oil-based ink and a wooden press. Within fifty years")
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    ref = run_greedy(model, ids, kvbound.make_cache(model, "full"), 100)
    cache = kvbound.make_cache(model, "offload", budget=ids.shape[1] // 4)
    new, stats = speculative_greedy(model, ids, cache, k=4, max_new_tokens=100)
    assert new[0].tolist() == ref
    assert stats.mean_accepted > 1  # a trained model's streaming draft mostly agrees
    cache.close()
