"""Policies through kvbound's tiered attention: exact tiers read in place, scores from the model's attention."""

import pytest
import torch

import kvbound
from kvbound import attention
from kvbound.cache import offload
from kvbound.cache.hot_window import HotWindowLayer
from kvbound.generation import prefill

from conftest import prompt_ids, run_greedy, tiny


@pytest.fixture
def count_tiered(monkeypatch):
    """Counts attention calls that received tiers (blocks or a scoring request)."""
    calls = []
    real = attention.tiered_attention

    def counting(query, blocks, *args, **kwargs):
        calls.append((len(blocks), kwargs.get("mass_rows", 0)))
        return real(query, blocks, *args, **kwargs)

    monkeypatch.setattr(attention, "tiered_attention", counting)
    return calls


def greedy_chunked(model, ids, cache, n, chunk):
    prefill(model, ids[:, :-1], cache, chunk)
    return run_greedy(model, ids, cache, n)


@pytest.mark.parametrize("policy", ["offload", "kv-direct"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_exact_policies_hand_blocks_to_attention(name, policy, count_tiered, monkeypatch):
    monkeypatch.setattr(HotWindowLayer, "SMALL_RECALL", 0)  # every recalled span goes as blocks
    model = tiny(name)
    ids = prompt_ids(18)
    ref = run_greedy(model, ids, kvbound.make_cache(model, "full"), 8)
    cache = kvbound.make_cache(model, policy, 4)
    assert model.config._attn_implementation == "kvbound"
    assert greedy_chunked(model, ids, cache, 8, 5) == ref
    assert any(blocks for blocks, _ in count_tiered)
    cache.close()


def test_short_recalled_spans_are_concatenated_and_exact(count_tiered, monkeypatch):
    """Up to SMALL_RECALL recalled tokens (offload's store views) go in front of the hot K/V (one
    attention call, no merge); past it, as blocks. Both stay token-identical to full."""
    model = tiny("tiny-llama")
    ids = prompt_ids(18)
    ref = run_greedy(model, ids, kvbound.make_cache(model, "full"), 8)
    monkeypatch.setattr(HotWindowLayer, "SMALL_RECALL", 10)
    decided = []
    real = HotWindowLayer._small_recall
    monkeypatch.setattr(HotWindowLayer, "_small_recall", lambda self, blocks: decided.append(real(self, blocks))
                        or decided[-1])
    cache = kvbound.make_cache(model, "offload", 4)
    assert greedy_chunked(model, ids, cache, 8, 5) == ref
    assert True in decided and False in decided  # short spans concatenated, longer ones (up to 22) as blocks
    assert any(blocks for blocks, _ in count_tiered)
    cache.close()


@pytest.mark.parametrize("read", ["mmap", "pread"])
def test_offload_segments_and_reads_match_full(read, monkeypatch):
    """Spans crossing several file segments (one attention block each), both read modes."""
    monkeypatch.setattr(offload, "SEGMENT", 16)  # tiny-llama: 256-byte records -> 16-token segments
    model = tiny("tiny-llama")
    ids = prompt_ids(40)
    ref = run_greedy(model, ids, kvbound.make_cache(model, "full"), 10)
    cache = kvbound.make_cache(model, "offload", 3, read=read)
    assert greedy_chunked(model, ids, cache, 10, 7) == ref
    assert cache.layers[0].store.seg == 16 and cache.layers[0].store.end > 2 * 16
    if read == "mmap":
        assert len(cache.layers[0].store.maps) >= 3
    cache.close()


def test_offload_sliding_ring_reused_within_a_step_matches_full():
    """A chunk longer than hot + max_rollback on a sliding layer overwrites ring slots the step
    still reads: those blocks are copied before the spill."""
    model = tiny("tiny-gemma3")  # sliding window 6
    ids = prompt_ids(30)
    ref = run_greedy(model, ids, kvbound.make_cache(model, "full"), 8)
    cache = kvbound.make_cache(model, "offload", 1, max_rollback=0)
    assert greedy_chunked(model, ids, cache, 8, 9) == ref
    cache.close()


def test_eager_models_concatenate_tiers(count_tiered):
    """A model that is not on sdpa keeps its attention; the cache concatenates tiers for it."""
    model = tiny("tiny-llama", "eager")
    ids = prompt_ids(14)
    ref = run_greedy(model, ids, kvbound.make_cache(model, "full"), 6)
    assert run_greedy(model, ids, kvbound.make_cache(model, "offload", 3), 6) == ref
    assert model.config._attn_implementation == "eager" and not count_tiered


@pytest.mark.parametrize("policy,options", [("h2o", {"recent": 2}), ("tova", {}), ("snapkv", {"window": 3, "kernel": 3})])
def test_scored_policies_take_scores_from_attention_and_select_as_before(policy, options, count_tiered):
    """Through tiered attention (probabilities from the model's attention call) a scored policy
    keeps exactly what it keeps when it projects the query again and scores separately (eager)."""
    ids = prompt_ids(16)
    kept = {}
    for attn in ["eager", "sdpa"]:
        model = tiny("tiny-qwen3", attn)
        cache = kvbound.make_cache(model, policy, 6, **options)
        tokens = greedy_chunked(model, ids, cache, 6, 5)
        state = [getattr(layer, {"h2o": "scores", "snapkv": "votes"}.get(policy, "positions")) for layer in cache.layers]
        kept[attn] = (tokens, [layer.positions.clone() for layer in cache.layers], state)
    assert any(rows for _, rows in count_tiered)  # the sdpa model scored through attention
    assert kept["sdpa"][0] == kept["eager"][0]
    for a, b in zip(kept["sdpa"][1], kept["eager"][1]):
        assert torch.equal(a, b)
    for a, b in zip(kept["sdpa"][2], kept["eager"][2]):  # h2o's scores, snapkv's stored votes
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
