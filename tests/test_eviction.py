"""Lossy eviction policies: streaming, h2o, tova, snapkv and the token scorers expected-attention, kvzip,
keydiff, knorm (see kvbound.cache.evicting; the scorers' reference tests: tests/test_scorers.py)."""

import functools

import pytest
import torch

import kvbound
from kvbound.cache.base import nbytes
from kvbound.cache.evicting import attention_mass, keep_top, pool_votes
from kvbound.cache.snapkv import snapkv_scores
from kvbound.errors import KVBoundError

from conftest import FAMILIES, prompt_ids, run_greedy, tiny

POLICIES = ["streaming", "h2o", "tova", "snapkv", "expected-attention", "kvzip", "keydiff", "knorm"]
MAY_EVICT_NEWEST = {"tova", "expected-attention", "kvzip", "keydiff", "knorm"}  # may rank a new token last
DEFERRED = {"kvzip"}  # a multi-token pass is held whole until its reconstruction (peak = budget + the pass)
SMALL = {"snapkv": {"window": 3}}  # budget-7 runs: let snapkv's voted tokens matter


def forward(model, cache, ids):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def check_held(cache, budget, batch=1):
    """Every layer holds min(seen, capacity) fresh (non-view) tokens; bytes are what the tensors hold."""
    seen = cache.get_seq_length()
    for layer in cache.layers:
        cap = budget if layer.sliding_window is None else min(budget, layer.sliding_window - 1)
        n = min(seen, cap)
        assert layer.keys.shape[-2] == layer.values.shape[-2] == layer.positions.shape[-1] == n
        assert layer.keys._base is None and layer.values._base is None  # evicted K/V really freed
        pos = layer.positions
        assert bool((pos[..., 1:] > pos[..., :-1]).all()) and int(pos.max()) < seen
        if cache.policy_name not in MAY_EVICT_NEWEST:
            assert bool((pos[..., -1] == seen - 1).all())
        if layer.sliding_window is not None:  # contiguous recent suffix on sliding layers
            assert torch.equal(pos, torch.arange(seen - n, seen).expand_as(pos))
    held = sum(nbytes(layer.keys, layer.values) for layer in cache.layers)
    assert cache.bytes_by_tier()["hot_kv"] == held
    assert held <= budget * cache.kv_bytes_per_token * batch
    if cache.policy_name not in DEFERRED:
        assert cache.memory_report()["peak_hot_kv_bytes"] <= budget * cache.kv_bytes_per_token * batch


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_budget_respected_after_every_step(name, policy):
    model, budget = tiny(name), 7
    cache = kvbound.make_cache(model, policy, budget, **SMALL.get(policy, {}))
    nxt = forward(model, cache, prompt_ids(15))
    check_held(cache, budget)
    for step in range(10):
        if step == 5:  # a multi-token step after eviction (a second turn)
            nxt = torch.cat([nxt, prompt_ids(4, seed=7)], dim=1)
        nxt = forward(model, cache, nxt)
        check_held(cache, budget)
    assert cache.get_seq_length() == 15 + 10 + 4


@functools.lru_cache(maxsize=None)
def full_reference(name: str) -> list[int]:
    model = tiny(name)
    return run_greedy(model, prompt_ids(14), kvbound.make_cache(model, "full"), 12)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_budget_beyond_length_matches_full(name, policy):
    model = tiny(name)
    assert run_greedy(model, prompt_ids(14), kvbound.make_cache(model, policy, 26), 12) == full_reference(name)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", ["tiny-gemma3"])  # sliding + full layers: the hardest masks
def test_sdpa_and_eager_agree_under_eviction(name, policy):
    """Masks stay consistent with the keys returned for both attention implementations."""
    if policy == "knorm":
        pytest.skip("Gemma 3's k_norm leaves every key of the random tiny model with norm ~sqrt(d): knorm ranks "
                    "float noise, which differs between sdpa and eager")
    ids = prompt_ids(16)
    outs = []
    for attn in ["sdpa", "eager"]:
        model = tiny(name, attn)
        cache = kvbound.make_cache(model, policy, 6, **SMALL.get(policy, {}))
        first = run_greedy(model, ids, cache, 6)
        more = torch.cat([ids, torch.tensor([first]), prompt_ids(5, seed=3)], dim=1)  # second turn
        outs.append(first + run_greedy(model, more, cache, 6))
    assert outs[0] == outs[1]


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_kept_tokens_are_the_original_keys(name, policy):
    """Kept K/V are the full cache's K/V at the kept positions (original RoPE, per-head gather)."""
    model = tiny(name)
    ids = prompt_ids(20)
    full = kvbound.make_cache(model, "full")
    cache = kvbound.make_cache(model, policy, 7, **SMALL.get(policy, {}))
    forward(model, full, ids)
    forward(model, cache, ids)
    for lf, lc in zip(full.layers, cache.layers):
        first = 20 - lf.keys.shape[-2]  # full sliding layers hold only the window
        idx = (lc.positions - first).unsqueeze(-1).expand_as(lc.keys)
        assert torch.equal(lc.keys, lf.keys.gather(2, idx))
        assert torch.equal(lc.values, lf.values.gather(2, idx))


@pytest.mark.parametrize("name", FAMILIES)
def test_streaming_keeps_sinks_and_recent(name):
    model = tiny(name)
    cache = kvbound.make_cache(model, "streaming", 7, sinks=3)
    nxt = forward(model, cache, prompt_ids(12))
    for _ in range(5):
        nxt = forward(model, cache, nxt)
    seen = cache.get_seq_length()
    for layer in cache.layers:
        if layer.sliding_window is None:
            expect = [0, 1, 2] + list(range(seen - 4, seen))
        else:
            expect = list(range(seen - min(7, layer.sliding_window - 1), seen))
        assert layer.positions[0, 0].tolist() == expect
        assert bool((layer.positions == layer.positions[:, :1]).all())  # same tokens in every head


# --------------------------------------------------------------------------- scores vs the model's own attention


def reference_attention(model, ids):
    """Per-layer attention probabilities [B, heads, T, T] from the model itself (eager, full cache)."""
    with torch.no_grad():
        return model(ids, past_key_values=kvbound.make_cache(model, "full"), output_attentions=True).attentions


def group_sum(probs, kv_heads):
    """[B, heads, ..., n] -> [B, kv_heads, ..., n], summing the query heads of each group."""
    b, h = probs.shape[:2]
    return probs.reshape(b, kv_heads, h // kv_heads, *probs.shape[2:]).sum(2)


def assert_kept(layer, scores, k, protect_last=0):
    """The layer kept exactly the top-``k`` of ``scores`` [B, kv_heads or 1, n] (newest protected)."""
    scores = scores.clone()
    scores[..., scores.shape[-1] - protect_last:] = float("inf")
    expect = scores.topk(k, dim=-1).indices.sort(-1).values
    assert torch.equal(layer.positions, expect.expand_as(layer.positions))


@pytest.mark.parametrize("name", FAMILIES)
def test_prefill_scores_match_model_attention(name):
    """h2o / tova / snapkv rank tokens with the attention the model itself computes (eager weights)."""
    model, t, budget = tiny(name, "eager"), 20, 8
    ids = prompt_ids(t)
    attn = reference_attention(model, ids)
    caches = {"h2o": kvbound.make_cache(model, "h2o", budget, recent=2), "tova": kvbound.make_cache(model, "tova", budget),
              "snapkv": kvbound.make_cache(model, "snapkv", budget, window=3, kernel=3)}
    for cache in caches.values():
        forward(model, cache, ids)
    for l, probs in enumerate(attn):
        if caches["h2o"].layers[l].sliding_window is not None:
            continue
        kv_heads = caches["h2o"].layers[l].keys.shape[1]
        acc = group_sum(probs, kv_heads).sum(2)  # every query's attention, per KV head
        assert_kept(caches["h2o"].layers[l], acc, budget, protect_last=2)
        kept = caches["h2o"].layers[l].positions
        torch.testing.assert_close(caches["h2o"].layers[l].scores, acc.gather(2, kept), rtol=1e-4, atol=1e-5)
        assert_kept(caches["tova"].layers[l], probs[:, :, -1].mean(1, keepdim=True), budget)
        votes = group_sum(probs[:, :, -3:], kv_heads).sum(2)[..., : t - 3]
        pooled = torch.stack([votes[..., max(0, j - 1): j + 2].amax(-1) for j in range(t - 3)], dim=-1)
        assert_kept(caches["snapkv"].layers[l], torch.cat([pooled, votes.new_full((*votes.shape[:2], 3), 1e9)], -1), budget)


# --------------------------------------------------------------------------- constructed cases


def one_hot_keys(n, kv_heads=2, d=16, scale=8.0):
    """Key j = scale * e_j in every head (so a query's logits pick tokens by coordinate)."""
    return (scale * torch.eye(d)[:n]).expand(1, kv_heads, n, d).clone()


def test_h2o_keeps_highest_accumulated_attention():
    """Hand-made queries through H2OLayer.update; a loop reference accumulates attention per KV head."""
    model = tiny("tiny-llama")  # 4 query heads, 2 KV heads, head_dim 16, scaling 1/4
    cache = kvbound.make_cache(model, "h2o", 4, recent=1)
    layer = cache.layers[0]
    keys = one_hot_keys(9)
    # query heads 0-1 (KV head 0) look for tokens {1, 2}; heads 2-3 (KV head 1) for {0, 3};
    # a little noise breaks ties between the tokens nobody looks for
    query = 0.5 * torch.randn(1, 4, 9, 16, generator=torch.Generator().manual_seed(0))
    for h, targets in enumerate([[1, 2], [1, 2], [0, 3], [0, 3]]):
        query[0, h, :, targets] += 8.0

    ref_held: list[list[int]] = [[], []]
    ref_score: list[dict[int, float]] = [{}, {}]
    for lo, hi in [(0, 6), (6, 7), (7, 8), (8, 9)]:  # 6-token prefill, then 3 decode steps
        layer.pending_query = query[:, :, lo:hi]
        layer.update(keys[:, :, lo:hi], keys[:, :, lo:hi])
        for kv in range(2):
            held = ref_held[kv] + list(range(lo, hi))
            for i in range(lo, hi):
                for h in (2 * kv, 2 * kv + 1):
                    vis = [j for j in held if j <= i]
                    w = torch.softmax(torch.stack([query[0, h, i] @ keys[0, kv, j] / 4 for j in vis]), 0)
                    for j, p in zip(vis, w.tolist()):
                        ref_score[kv][j] = ref_score[kv].get(j, 0.0) + p
            if len(held) > 4:  # keep the newest + the 3 highest accumulated among the older ones
                held = sorted(sorted(held[:-1], key=lambda j: -ref_score[kv][j])[:3]) + held[-1:]
            ref_held[kv] = held
        assert layer.positions[0].tolist() == ref_held
    assert ref_held[0] != ref_held[1]  # per-head selection
    assert ref_held[0][:3] != [5, 6, 7] and ref_held[1][:3] != [5, 6, 7]  # heavy hitters, not recency
    assert {1, 2} <= set(ref_held[0]) and {0, 3} <= set(ref_held[1])  # each head kept its targets
    expect = torch.tensor([[ref_score[kv][j] for j in ref_held[kv]] for kv in range(2)])
    torch.testing.assert_close(layer.scores[0], expect, rtol=1e-5, atol=1e-6)


def test_tova_evicts_lowest_head_averaged_attention():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "tova", 5)
    layer = cache.layers[0]
    keys = one_hot_keys(6)
    layer.update(keys[:, :, :5], keys[:, :, :5])  # fits: no scoring, no query needed
    # current query (token 5): head 0 gives token 2 the least, head 1 token 3, but on average
    # over heads token 4 gets the least
    w = torch.tensor([[3.0, 3.0, 0.0, 2.0, 0.5, 3.0], [3.0, 3.0, 2.0, 0.0, 0.5, 3.0],
                      [3.0, 3.0, 2.0, 2.0, 0.5, 3.0], [3.0, 3.0, 2.0, 2.0, 0.5, 3.0]])
    query = torch.zeros(1, 4, 1, 16)
    query[0, :, 0, :6] = w
    probs = torch.softmax(w * 8 / 4, dim=-1).mean(0)
    per_head_lowest = [int(torch.softmax(w[h] * 2, -1).argmin()) for h in range(4)]
    assert per_head_lowest[:2] == [2, 3] and int(probs.argmin()) == 4  # construction check
    layer.pending_query = query
    layer.update(keys[:, :, 5:6], keys[:, :, 5:6])
    assert layer.positions[0].tolist() == [[0, 1, 2, 3, 5]] * 2


def test_snapkv_keeps_what_the_window_attends_to():
    votes = torch.tensor([[[0.1, 0.5, 0.0, 0.0, 0.0, 0.2, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0]]])
    # kernel 1: top-3 older tokens by raw votes + the 2-token window
    assert keep_top(snapkv_scores(votes, 2, 1), 5).tolist() == [[[1, 5, 6, 10, 11]]]
    # kernel 3: max pooling spreads token 6's votes to its neighbours 5 and 7
    assert keep_top(snapkv_scores(votes, 2, 3), 5).tolist() == [[[5, 6, 7, 10, 11]]]
    assert pool_votes(votes, 3)[0, 0, :3].tolist() == pytest.approx([0.5, 0.5, 0.5])

    # through SnapKVLayer.update: the 2 window queries look at tokens 2 and 7
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "snapkv", 4, window=2, kernel=1)
    layer = cache.layers[0]
    keys = one_hot_keys(10)
    query = torch.zeros(1, 4, 2, 16)
    query[0, :, 0, 2] = query[0, :, 1, 7] = 8.0
    layer.pending_query = query
    layer.update(keys, keys)
    assert layer.positions[0].tolist() == [[2, 7, 8, 9]] * 2
    # decoding: the newest window is now the queries of tokens 9 (looks at 7) and 10 (looks at 8);
    # token 2, voted for by token 8's query which left the window, is evicted
    q10 = torch.zeros(1, 4, 1, 16)
    q10[0, :, 0, 8] = 8.0
    layer.pending_query = q10
    k10 = torch.zeros(1, 2, 1, 16)
    layer.update(k10, k10)
    assert layer.positions[0].tolist() == [[7, 8, 9, 10]] * 2
    # the stored votes: token 9's query as cast at prefill (on 7; none on 10, which came later),
    # token 10's (on 8); 2 query heads per KV head; rows follow the kept tokens 7, 8, 9, 10
    expect = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]]).T
    torch.testing.assert_close(layer.votes[0], expect.expand(2, 4, 2), atol=1e-5, rtol=0)


def snapkv_reference_check(layer, held, pos, probs, records, window, budget, kernel):
    """Check one snapkv layer after one step against a loop over the model's own attention.

    ``held`` ``[kv_heads, m]``: the positions the layer held before the step; ``pos``: the step's
    positions; ``probs`` ``[kv_heads, T, m + T]``: the step's attention (eager weights, query heads
    summed per KV head) over the keys the layer returned (held, then new). ``records`` maps
    (kv head, query position) to {key position: vote}, each query's attention at its own step."""
    kv_heads = held.shape[0]
    for kv in range(kv_heads):
        keys = held[kv].tolist() + pos
        for t, q in enumerate(pos):
            records[kv, q] = {k: float(probs[kv, t, j]) for j, k in enumerate(keys) if k <= q}
        kept = layer.positions[0, kv].tolist()
        voters = sorted(q for (h, q) in records if h == kv)[-window:]
        if len(keys) <= budget:
            assert kept == keys
            continue
        protect = min(window, budget)
        older = keys[:len(keys) - protect]
        votes = [sum(records[kv, q].get(k, 0.0) for q in voters) for k in older]
        pooled = [max(votes[max(0, j - kernel // 2):j + kernel // 2 + 1]) for j in range(len(votes))]
        assert kept[-protect:] == keys[-protect:]  # the window's own tokens
        chosen = set(kept[:-protect])
        assert len(chosen) == budget - protect and chosen <= set(older)
        lowest_kept = min(p for p, k in zip(pooled, older) if k in chosen)
        highest_dropped = max(p for p, k in zip(pooled, older) if k not in chosen)
        assert lowest_kept >= highest_dropped - 1e-5  # a top-(budget - window), ties either way
        # the stored votes (rows = the kept tokens) of the newest `window` queries
        expect = torch.tensor([[records[kv, q].get(k, 0.0) for k in kept] for q in voters])
        torch.testing.assert_close(layer.votes[0, kv].T, expect, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_snapkv_votes_are_each_querys_own_attention(name):
    """Prefill, decode steps and a 2-token step (fewer rows than the window), each evicting: the
    newest ``window`` queries vote with the attention they gave at their own step (the model's
    eager weights), by token, however many evictions happened since."""
    window, budget, kernel = 4, 8, 3
    model = tiny(name, "eager")
    cache = kvbound.make_cache(model, "snapkv", budget, window=window, kernel=kernel)
    records: dict[int, dict] = {l: {} for l in range(len(cache.layers))}
    step, seen = prompt_ids(14), 0
    for turn in range(10):
        if turn == 5:
            step = torch.cat([step, prompt_ids(1, seed=5)], dim=1)
        held = [None if l.positions is None else l.positions[0].clone() for l in cache.layers]
        with torch.no_grad():
            out = model(step, past_key_values=cache, use_cache=True, output_attentions=True)
        pos = list(range(seen, seen + step.shape[1]))
        seen += step.shape[1]
        for l, layer in enumerate(cache.layers):
            if layer.is_sliding:
                continue
            kv_heads = layer.keys.shape[1]
            before = held[l] if held[l] is not None else torch.empty(kv_heads, 0, dtype=torch.long)
            probs = group_sum(out.attentions[l], kv_heads)[0]
            snapkv_reference_check(layer, before, pos, probs, records[l], window, budget, kernel)
        step = out.logits[:, -1:].argmax(-1)
    assert seen == 14 + 9 + 1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_snapkv_with_budget_below_window_keeps_what_window_keeps(name):
    """budget <= window: the window fills the budget; stored queries older than every held key
    (they see nothing) must not disturb the choice."""
    model = tiny(name)
    caches = [kvbound.make_cache(model, "snapkv", 4, window=8), kvbound.make_cache(model, "window", 4)]
    nxt = [forward(model, c, prompt_ids(12)) for c in caches]
    for _ in range(6):
        nxt = [forward(model, c, t) for c, t in zip(caches, nxt)]
        seen = caches[0].get_seq_length()
        for layer, wl in zip(caches[0].layers, caches[1].layers):
            assert torch.equal(layer.positions, torch.arange(seen - 4, seen).expand_as(layer.positions))
            assert torch.equal(layer.keys, wl.keys)


def test_attention_mass_is_causal_and_sums_to_queries():
    q = torch.randn(1, 4, 3, 16)
    k = torch.randn(1, 2, 5, 16)
    mass = attention_mass(q, torch.tensor([2, 3, 4]), k, torch.arange(5).expand(1, 2, 5), 0.25)
    assert mass.shape == (1, 2, 5)
    torch.testing.assert_close(mass.sum(-1), torch.full((1, 2), 6.0))  # 3 queries x 2 heads per group
    later = attention_mass(q[:, :, :1], torch.tensor([0]), k, torch.arange(5).expand(1, 2, 5), 0.25)
    torch.testing.assert_close(later[..., 1:], torch.zeros(1, 2, 4))  # position 0 sees only token 0


# --------------------------------------------------------------------------- options, batches


@pytest.mark.parametrize("policy,budget,options,match", [
    ("streaming", 4, {}, "budget > sinks"),
    ("streaming", 8, {"sinks": 8}, "budget > sinks"),
    ("streaming", 8, {"sinks": -1}, "sinks"),
    ("h2o", 8, {"recent": 9}, "recent must be <= budget"),
    ("h2o", 8, {"recent": -1}, "recent"),
    ("snapkv", 8, {"window": -1}, "window"),
    ("snapkv", 8, {"window": 0}, "window"),
    ("snapkv", 8, {"kernel": 4}, "kernel must be odd"),
    ("tova", 8, {"window": 3}, "unknown option"),
    ("h2o", 8, {"heavy": 3}, "valid options: ada_floor, allocation, .*codec_outliers, pyramid_beta, recent"),
])
def test_bad_options_are_clear_errors(policy, budget, options, match):
    with pytest.raises(KVBoundError, match=match):
        kvbound.make_cache(tiny("tiny-llama"), policy, budget, **options)


def test_unsupported_family_is_a_clear_error():
    with pytest.raises(KVBoundError, match="supported"):
        kvbound.make_cache(tiny("tiny-gpt2"), "h2o", 8)


@pytest.mark.parametrize("policy", POLICIES)
def test_unpadded_batch_matches_single_sequences(policy):
    model = tiny("tiny-llama")
    ids = prompt_ids(14, seed=5, batch=2)
    cache = kvbound.make_cache(model, policy, 6, **SMALL.get(policy, {}))
    batched = kvbound.generation.greedy(model, ids, cache, 10, stop_at_eos=False)
    check_held(cache, 6, batch=2)
    for row in range(2):
        single = run_greedy(model, ids[row:row + 1], kvbound.make_cache(model, policy, 6, **SMALL.get(policy, {})), 10)
        assert batched[row].tolist() == single


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy", POLICIES)
def test_padded_batch_is_refused(policy, attn):
    model = tiny("tiny-llama", attn)
    ids = prompt_ids(10, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with pytest.raises(KVBoundError, match="padded batches"):
        model.generate(ids, attention_mask=mask, past_key_values=kvbound.make_cache(model, policy, 6),
                       max_new_tokens=2, do_sample=False)


@pytest.mark.slow
def test_real_model_policies_respect_budget_and_rank_like_eager():
    """SmolLM2: every policy keeps its budget; tova's kept tokens = the last query's top attention."""
    from conftest import real_model

    model, tok = real_model()
    ids = tok("The canal age began when a duke wanted cheaper coal for the town of Manchester, "
              "so his engineer dug a waterway from the mines to the mills and the price fell.",
              return_tensors="pt").input_ids
    assert ids.shape[1] > 16
    for policy in POLICIES:
        cache = kvbound.make_cache(model, policy, 16, **({"window": 4} if policy == "snapkv" else {}))
        nxt = forward(model, cache, ids)
        for _ in range(3):
            nxt = forward(model, cache, nxt)
            check_held(cache, 16)
    cache = kvbound.make_cache(model, "tova", 16)
    forward(model, cache, ids)
    model.set_attn_implementation("eager")
    try:
        attn = reference_attention(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    for layer, probs in zip(cache.layers, attn):
        assert_kept(layer, probs[:, :, -1].mean(1, keepdim=True), 16)


@pytest.mark.parametrize("policy", POLICIES)
def test_reset_forgets_everything(policy):
    model = tiny("tiny-qwen3")
    ids = prompt_ids(12, seed=4)
    cache = kvbound.make_cache(model, policy, 5, **SMALL.get(policy, {}))
    first = run_greedy(model, ids, cache, 6)
    cache.reset()
    assert cache.get_seq_length() == 0
    assert run_greedy(model, ids, cache, 6) == first


@pytest.mark.parametrize("policy", POLICIES)
def test_beam_search_reorders_policy_state(policy):
    """Beams reorder keys, positions and scores together: with room for everything it is full's beam search."""
    model = tiny("tiny-llama")
    ids = prompt_ids(10, seed=6)
    kw = dict(num_beams=3, max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(ids))
    ref = model.generate(ids, past_key_values=kvbound.make_cache(model, "full"), **kw)
    assert torch.equal(model.generate(ids, past_key_values=kvbound.make_cache(model, policy, 20), **kw), ref)
    cache = kvbound.make_cache(model, policy, 5, **SMALL.get(policy, {}))
    forward(model, cache, prompt_ids(12, seed=6, batch=2))  # two sequences, different kept tokens
    layer = cache.layers[-1]
    before = {name: getattr(layer, name).clone() for name in layer.batch_state
              if getattr(layer, name) is not None}  # e.g. kvzip's quota exists with allocation=global only
    cache.reorder_cache(torch.tensor([1, 0]))
    for name, t in before.items():
        assert torch.equal(getattr(layer, name), t.flip(0)), name
