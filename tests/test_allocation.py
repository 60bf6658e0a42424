"""Budgets over layers and heads (kvbound.cache.allocation) and ragged heads (kvbound.cache.evicting)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface
from transformers.cache_utils import DynamicCache

import kvbound
from kvbound.cache.allocation import Kept, cake_capacities, choose, head_counts, pyramid_capacities
from kvbound.cache.evicting import lengths_mask, pack, unpack
from kvbound.errors import KVBoundError
from conftest import FAMILIES, prompt_ids, run_greedy, tiny

# --------------------------------------------------------------------------- the formulas


def naive_ada(scores: torch.Tensor, capacity: int, floor: float) -> list[set[int]]:
    """Ada-KV by the formula, one head at a time: n_h of the layer's top H*capacity scores fall in
    head h; it keeps its own top round((1 - floor) n_h + floor capacity)."""
    h, n = scores.shape
    flat = sorted(((float(scores[i, j]), i, j) for i in range(h) for j in range(n)), reverse=True)[:h * capacity]
    n_h = [sum(1 for _, i, _ in flat if i == head) for head in range(h)]
    want = [(1 - floor) * n_h[i] + floor * capacity for i in range(h)]
    counts = [int(w) for w in want]
    for i in sorted(range(h), key=lambda i: want[i] - counts[i], reverse=True)[:h * capacity - sum(counts)]:
        counts[i] += 1
    return [set(scores[i].argsort(descending=True)[:counts[i]].tolist()) for i in range(h)]


@pytest.mark.parametrize("floor", [0.0, 0.2, 0.5])
def test_ada_matches_the_formula(floor):
    gen = torch.Generator().manual_seed(3)
    scores = torch.rand(1, 4, 30, generator=gen) ** torch.tensor([1.0, 4.0, 0.3, 2.0]).view(1, 4, 1)
    kept = choose(scores, 8, "ada", floor)
    assert isinstance(kept, Kept)
    assert int(kept.counts.sum()) == 4 * 8  # the layer holds exactly heads x capacity
    got = [set(kept.mask[0, i].nonzero().flatten().tolist()) for i in range(4)]
    assert got == naive_ada(scores[0], 8, floor)
    assert len(set(kept.counts[0].tolist())) > 1  # heads really differ


def test_ada_keeps_protected_and_ignores_padding():
    scores = torch.rand(2, 3, 20, generator=torch.Generator().manual_seed(4))
    valid = torch.ones(2, 3, 20, dtype=torch.bool)
    valid[:, 1, 10:16] = False  # head 1 holds fewer tokens: padding before the step's new tokens
    kept = choose(scores, 6, "ada", 0.2, valid, protect_last=3)
    assert not bool((kept.mask & ~valid).any())
    assert bool(kept.mask[..., -3:].all())
    assert kept.counts.sum(-1).tolist() == [18, 18]


def test_uniform_is_the_old_top_k():
    scores = torch.rand(1, 2, 12, generator=torch.Generator().manual_seed(5))
    idx = choose(scores, 5, "uniform")
    assert torch.equal(idx, scores.topk(5, dim=-1).indices.sort(dim=-1).values)
    assert choose(scores, 12, "uniform") is None


def test_pyramid_and_cake_capacities_keep_the_total():
    caps = pyramid_capacities(100, 6, 20.0)
    assert sum(caps) == 600 and caps == sorted(caps, reverse=True) and caps[-1] == 5
    assert sum(pyramid_capacities(100, 6, 20.0, n=150, window=8)) == 600  # short context: capped at n - window
    assert max(pyramid_capacities(100, 6, 20.0, n=150, window=8)) == 142
    caps = cake_capacities([1.0, 3.0, 0.5, 0.5], 50, 8)
    assert sum(caps) == 200 and min(caps) >= 8 and caps[1] == max(caps)
    capped = cake_capacities([1.0, 30.0, 1.0], 50, 8, limit=60)
    assert sum(capped) == 150 and max(capped) == 60


def test_pack_unpack_round_trip():
    lengths = torch.tensor([[3, 1, 4], [2, 2, 0]])
    mask = lengths_mask(lengths, 4)
    x = torch.randn(2, 3, 4, 5)
    flat = pack(x, mask)
    assert flat.shape == (12, 5)
    back = unpack(flat, mask)
    torch.testing.assert_close(back[mask], x[mask])
    votes = torch.randn(2, 3, 7, 4)  # tokens on dim 3
    torch.testing.assert_close(unpack(pack(votes, mask, 3), mask, 3)[..., :1, :][mask.unsqueeze(2)],
                               votes[..., :1, :][mask.unsqueeze(2)])


# --------------------------------------------------------------------------- ragged attention


def _masked_reference(kept: dict[int, torch.Tensor]):
    """A transformers attention function over the full K/V that masks, per KV head, every past
    token the ragged cache dropped (``kept[layer]`` ``[B, kv_heads, n]`` bool over the past)."""

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kw):
        b, heads, t, d = query.shape
        kv = key.shape[1]
        n = key.shape[-2]
        if n != kept[module.layer_idx].shape[-1] + 1:  # a sliding layer: the window's suffix, as kvbound keeps
            vis = torch.ones(1, 1, 1, n, dtype=torch.bool)
        else:  # the next step: per head, the tokens the ragged cache kept, plus the new one
            seen = kept[module.layer_idx]
            vis = torch.cat([seen, torch.ones(b, kv, n - seen.shape[-1], dtype=torch.bool)], -1)
            vis = vis.repeat_interleave(heads // kv, dim=1).unsqueeze(2)  # [B, H, 1, n]
        k = key.repeat_interleave(heads // kv, dim=1).float()
        v = value.repeat_interleave(heads // kv, dim=1).float()
        logits = query.float() @ k.transpose(-1, -2) * (scaling or d ** -0.5)
        cap = softcap or getattr(module, "attn_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        probs = torch.softmax(logits.masked_fill(~vis, float("-inf")), -1)
        return (probs @ v).to(query.dtype).transpose(1, 2).contiguous(), None

    return forward


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_ragged_heads_attend_like_masked_full_kv(name):
    """After an ``ada`` prefill (ragged heads), the next step's logits equal those of the full K/V
    with every dropped token masked out, per head (float rounding)."""
    model = tiny(name)
    ids = prompt_ids(40, seed=7)
    cache = kvbound.make_cache(model, "snapkv", 12, window=4, allocation="ada")
    model(ids, past_key_values=cache, use_cache=True)
    assert any(layer.lengths is not None for layer in cache.layers), "the selection should be ragged"
    kept = {}
    for i, layer in enumerate(cache.layers):
        if layer.lengths is not None:
            pos = unpack(layer.positions, lengths_mask(layer.lengths, layer.width), 2, -1)
        else:
            pos = layer.positions
        vis = torch.zeros(1, pos.shape[1], 41, dtype=torch.bool)  # column 40 takes the padding
        vis.scatter_(2, pos.masked_fill(pos < 0, 40), True)
        kept[i] = vis[..., :40]
    nxt = torch.tensor([[17]])
    out = model(nxt, past_key_values=cache, use_cache=True).logits
    held = sum(int(layer.lengths.sum()) if layer.lengths is not None else layer.keys.shape[1] * layer.keys.shape[2]
               for layer in cache.layers)
    assert cache.memory_report()["hot_kv_bytes"] == held * 2 * cache.layers[0].keys.shape[-1] * 4

    AttentionInterface.register("kvbound_test_masked", _masked_reference(kept))
    before = model.config._attn_implementation
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full, use_cache=True)  # the prefill as the ragged cache saw it (all tokens)
    try:
        model.set_attn_implementation("kvbound_test_masked")
        ref = model(nxt, past_key_values=full, use_cache=True).logits
    finally:
        model.set_attn_implementation(before)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("policy", ["h2o", "tova", "snapkv", "knorm", "keydiff", "expected-attention", "kvzip"])
def test_ada_holds_heads_x_budget_while_decoding(policy):
    model = tiny("tiny-mha")
    cache = kvbound.make_cache(model, policy, 10, allocation="ada")
    run_greedy(model, prompt_ids(30), cache, 12)
    report = cache.memory_report()
    for layer, counts in zip(cache.layers, report["kept_tokens"]):
        assert sum(counts) == 4 * 10
    assert report["allocation"] == "ada"
    d = cache.layers[0].keys.shape[-1]
    assert report["hot_kv_bytes"] == sum(map(sum, report["kept_tokens"])) * 2 * d * 4


def test_pyramid_and_cake_spread_layers_at_the_same_total():
    model = tiny("tiny-llama")
    totals = {}
    for alloc, extra in [("uniform", {}), ("pyramid", {"pyramid_beta": 4}), ("cake", {"cake_window": 4})]:
        cache = kvbound.make_cache(model, "snapkv", 16, window=4, allocation=alloc, **extra)
        run_greedy(model, prompt_ids(50), cache, 6)
        kept = cache.memory_report()["kept_tokens"]
        totals[alloc] = sum(map(sum, kept))
        if alloc == "pyramid":
            assert [c[0] for c in kept] == sorted((c[0] for c in kept), reverse=True) and kept[0][0] > kept[-1][0]
        if alloc == "cake":
            assert len(cache.cake_prefs) == len(cache.layers)
    assert totals["pyramid"] == totals["uniform"] and abs(totals["cake"] - totals["uniform"]) <= 0.02 * totals["uniform"]


def test_ada_with_codec_beams_and_chunks():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "h2o", 10, allocation="ada", codec="int8")
    run_greedy(model, prompt_ids(30), cache, 6)
    assert sum(map(sum, cache.memory_report()["kept_tokens"])) == len(cache.layers) * 2 * 10
    cache = kvbound.make_cache(model, "snapkv", 10, window=4, allocation="ada")
    out = model.generate(prompt_ids(30), past_key_values=cache, max_new_tokens=5, num_beams=3, do_sample=False)
    assert out.shape[-1] == 35
    from kvbound.generation import prefill
    cache = kvbound.make_cache(model, "snapkv", 10, window=4, allocation="ada")
    prefill(model, prompt_ids(40), cache, chunk=12)
    assert all(sum(c) <= 20 for c in cache.memory_report()["kept_tokens"])


@pytest.mark.parametrize("options,match", [
    ({"allocation": "triangle"}, "allocation must be one of uniform, pyramid, ada, cake"),
    ({"allocation": "pyramid", "pyramid_beta": 40}, "below the floor"),
    ({"allocation": "ada", "ada_floor": 1.5}, "ada_floor"),
    ({"allocation": "ada", "ada_floor": 0.01}, "floor"),
])
def test_bad_allocations_are_one_line_errors(options, match):
    with pytest.raises(KVBoundError, match=match):
        kvbound.make_cache(tiny("tiny-llama"), "snapkv", 16, **options)


def test_ada_needs_kvbound_attention():
    with pytest.raises(KVBoundError, match="needs kvbound's attention"):
        kvbound.make_cache(tiny("tiny-llama", "eager"), "h2o", 16, allocation="ada")


# --------------------------------------------------------------------------- razor


def _held(layer, name):
    value = getattr(layer, name)
    if layer.lengths is None:
        return value
    return unpack(value, lengths_mask(layer.lengths, layer.width), 2, -1 if name == "positions" else 0)


@torch.no_grad()
def test_razor_compensation_token_is_the_weighted_mean_of_what_was_dropped(kv_home):
    """A prefill then two steps (the merge runs three times, the later ones weighted by what the
    token already stands for): each non-retrieval head holds sinks + recent + one token whose K/V
    is the plain mean of every token it dropped, weight = how many."""
    model = tiny("tiny-llama")
    ids = prompt_ids(50, seed=2)
    cache = kvbound.make_cache(model, "razor", 24, threshold=0.0, fraction=0.34, sinks=2)
    model(ids[:, :46], past_key_values=cache)
    for j in range(46, 50):
        model(ids[:, j:j + 1], past_key_values=cache)
    full = DynamicCache(config=model.config)
    model(ids, past_key_values=full)
    cap_r, recent = cache.head_capacities(50)
    assert cap_r == 50 and recent == 8
    checked = 0
    for i, layer in enumerate(cache.layers):
        pos, keys, values, weight = (_held(layer, name) for name in ("positions", "keys", "values", "weight"))
        for h in range(pos.shape[1]):
            n = int((pos[0, h] >= 0).sum())
            if bool(cache.retrieval[i][h]):
                assert pos[0, h, :n].tolist() == list(range(50))  # the whole context
                continue
            assert n == 2 + recent + 1
            comp = int(weight[0, h].argmax())
            others = set(pos[0, h, :n].tolist()) - {int(pos[0, h, comp])}
            assert others == {0, 1, *range(50 - recent, 50)}
            dropped = list(range(2, 50 - recent))
            assert int(weight[0, h, comp]) == len(dropped) and max(dropped) == int(pos[0, h, comp])
            torch.testing.assert_close(keys[0, h, comp], full.layers[i].keys[0, h, dropped].mean(0), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(values[0, h, comp], full.layers[i].values[0, h, dropped].mean(0), rtol=1e-4,
                                       atol=1e-5)
            checked += 1
    assert checked
    assert cache.memory_report()["hot_kv_bytes"] == 3 * 2 * 24 * 2 * 16 * 4  # heads x budget, exactly


def test_tiered_attention_bias_is_a_logit_offset():
    from kvbound.attention import tiered_attention
    q, k, v = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    bias = torch.zeros(1, 2, 6)
    bias[0, 0, 1] = float("-inf")
    bias[0, 1, 2] = 1.5
    out, _ = tiered_attention(q, [], k, v, torch.ones(1, 1, 2, 6, dtype=torch.bool), 0.3, key_bias=bias)
    logits = q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3 + bias.repeat_interleave(2, 1).unsqueeze(2)
    ref = torch.softmax(logits, -1) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(out, ref)


def test_razor_head_map_is_cached_and_rebuilt_when_corrupt_or_stale(kv_home):
    import json
    from kvbound.cache.razor import RazorCache
    from kvbound.cache.retrieval_heads import is_cached, map_path
    model = tiny("tiny-mha")
    assert not is_cached(model) and RazorCache.prepare(model) is True  # measured
    assert is_cached(model) and RazorCache.prepare(model) is False  # read
    kvbound.make_cache(model, "razor", 16, threshold=0.0)
    path = map_path(model)
    assert path.exists() and path.is_relative_to(kv_home)
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="was corrupt.*rebuilt"):
        kvbound.make_cache(model, "razor", 16, threshold=0.0)
    data = json.loads(path.read_text())
    data["fingerprint"] = "0" * 32
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="was stale.*rebuilt"):
        kvbound.make_cache(model, "razor", 16, threshold=0.0)


def test_razor_fingerprint_reads_a_sample_of_memory_mapped_weights(tmp_path):
    """The head map's weight fingerprint faults in a few pages of a memory-mapped weight, not all of
    it (a strided read of every page brings a whole embedding matrix into RSS),
    and still changes with the weights."""
    from kvbound.cache.retrieval_heads import _fingerprint
    from kvbound.rss import current_rss_bytes

    n = 64 << 20  # a 256 MiB float32 weight backed by a sparse file, as safetensors maps a checkpoint
    path = tmp_path / "weight.bin"
    with open(path, "wb") as f:
        f.truncate(4 * n)
    weight = torch.from_file(str(path), shared=True, size=n, dtype=torch.float32)

    class Mapped:
        def parameters(self):
            return iter([weight])

    before = current_rss_bytes()
    first = _fingerprint(Mapped())
    assert current_rss_bytes() - before < 16 << 20  # 64 entries, up to 64 KiB mapped around each
    small = torch.nn.Linear(64, 64)

    class Small:
        def parameters(self):
            return iter([small.weight])

    same = _fingerprint(Small())
    assert _fingerprint(Small()) == same and first != same
    model = tiny("tiny-llama")
    assert _fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == _fingerprint(model)  # one map for both
    with torch.no_grad():
        small.weight.mul_(1.01)
    assert _fingerprint(Small()) != same


@pytest.mark.parametrize("options,match", [
    ({}, "found 0 retrieval head"),  # random weights: no head above 2x chance
    ({"threshold": 0.0, "recent": 20}, "below the floors"),
    ({"threshold": 0.0, "fraction": 2}, "fraction"),
])
def test_razor_bad_input(kv_home, options, match):
    with pytest.raises(KVBoundError, match=match):
        kvbound.make_cache(tiny("tiny-mha"), "razor", 16, **options)


def test_razor_with_codec_and_beams(kv_home):
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "razor", 16, threshold=0.0, fraction=0.34, codec="int8")
    run_greedy(model, prompt_ids(40), cache, 6)
    assert sum(map(sum, cache.memory_report()["kept_tokens"])) == 3 * 2 * 16
    cache = kvbound.make_cache(model, "razor", 16, threshold=0.0, fraction=0.34)
    out = model.generate(prompt_ids(30), past_key_values=cache, max_new_tokens=4, num_beams=2, do_sample=False)
    assert out.shape[-1] == 34


def test_keydiff_anchor_of_a_ragged_head_is_its_own_keys_mean():
    from kvbound.cache.keydiff import keydiff_scores

    keys = torch.randn(1, 2, 6, 8)
    valid = torch.tensor([[[True] * 6, [True] * 3 + [False] * 3]])
    padded = keys.clone()
    padded[0, 1, 3:] = 0.0
    got = keydiff_scores(padded, valid)
    torch.testing.assert_close(got[0, 0], keydiff_scores(keys[:, :1])[0, 0])
    torch.testing.assert_close(got[0, 1, :3], keydiff_scores(keys[:, 1:2, :3])[0, 0])


@pytest.mark.parametrize("policy", ["knorm", "keydiff", "expected-attention", "kvzip"])
@pytest.mark.parametrize("allocation", ["pyramid", "ada"])
def test_query_free_scorers_take_every_allocation_at_the_same_total(policy, allocation):
    model = tiny("tiny-llama")
    totals = {}
    for alloc in ("uniform", allocation):
        cache = kvbound.make_cache(model, policy, 24, allocation=alloc)
        run_greedy(model, prompt_ids(40), cache, 6)
        totals[alloc] = sum(map(sum, cache.memory_report()["kept_tokens"]))
    assert totals[allocation] == totals["uniform"] == len(cache.layers) * 2 * 24


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_kvzip_reconstructs_the_unscored_tail_of_ragged_heads(name):
    """kvzip with ada: after a ragged eviction, the next overflowing chunk's reconstruction scores exactly
    each head's new tokens (its held entries at the chunk's positions), the repeat pass attends only what
    each head holds, and the layer ends ragged at heads x budget."""
    import kvbound.cache.kvzip as kvzip

    model, budget = tiny(name), 10
    cache = kvbound.make_cache(model, "kvzip", budget, allocation="ada", chunk=6)
    model(prompt_ids(24, seed=3), past_key_values=cache, use_cache=True)
    ragged = [i for i, layer in enumerate(cache.layers) if layer.lengths is not None]
    assert ragged, "the selection should be ragged"
    seen = []
    real = kvzip.kvzip_chunk_scores

    def spy(query, sink_keys, chunk_keys, repeat_keys, scaling, softcap=None):
        out = real(query, sink_keys, chunk_keys, repeat_keys, scaling, softcap)
        seen.append((chunk_keys.clone(), out.clone()))
        return out

    new_keys = {}
    update = kvzip.KVzipLayer.update

    def keep_new(layer, key_states, value_states, *args, **kwargs):
        if layer.cache.scoring is None and not layer.is_sliding:
            new_keys[layer.layer_idx] = key_states.clone()
        return update(layer, key_states, value_states, *args, **kwargs)

    kvzip.kvzip_chunk_scores, kvzip.KVzipLayer.update = spy, keep_new
    try:
        model(prompt_ids(9, seed=5), past_key_values=cache, use_cache=True)  # 9 new: chunks of 6 and 3
    finally:
        kvzip.kvzip_chunk_scores, kvzip.KVzipLayer.update = real, update
    assert cache.memory_report()["reconstructed_tokens"] > 0
    for layer, counts in zip(cache.layers, cache.memory_report()["kept_tokens"]):
        if not layer.is_sliding:
            assert sum(counts) == len(counts) * budget
            assert not bool(layer.scores.isnan().any())  # every held token scored
    # per chunk and full layer (in layer order), every head's keys of positions [24, 30), then [30, 33)
    assert len(seen) == 2 * len(cache.full_layers)
    for k, (chunk_keys, out) in enumerate(seen):
        i = cache.full_layers[k % len(cache.full_layers)]
        a, b = (0, 6) if k < len(cache.full_layers) else (6, 9)
        torch.testing.assert_close(chunk_keys, new_keys[i][..., a:b, :])
        assert bool(torch.isfinite(out).all()) and bool((out >= 0).all()) and bool((out <= 1).all())


def test_allocation_page_medians_over_rounds():
    """--rounds: the page's medians table takes each variant's median and divides by the first's; the
    per-round column pairs each run with the first variant's run of its own round, whatever order the
    round ran in (odd rounds run the variants in reverse)."""
    from kvbound.bench.scenarios.allocation import _medians

    def run(variant, rss, cpu, round_):
        return {"status": "ok", "tokens": 100, "budget_arg": 8, "budget": 8, "variant": variant, "round": round_,
                "hot_kv_bytes": 1000, "rss_added_bytes": rss * 2**20, "cpu_seconds_per_token": cpu,
                "prefill_cpu_seconds": 1.0}

    runs = [run("snapkv", 10, 0.1, 0), run("razor", 30, 0.2, 0), run("razor", 11, 0.12, 1),
            run("snapkv", 12, 0.1, 1), run("snapkv", 50, 0.3, 2), run("razor", 13, 0.11, 2)]
    text = "\n".join(_medians(runs))
    assert "| 100 | 8 | snapkv | 3 | 1,000 | 1.000 | 12.0 MiB | 1.000 | 0.1 | 1.000 | 1 | 1.000 | 1.000 (1.000–1.000) |" in text
    # per round: 0.2/0.1, 0.12/0.1, 0.11/0.3 -> median 1.2 (against a ratio of medians of 0.12/0.1)
    assert "| 100 | 8 | razor | 3 | 1,000 | 1.000 | 13.0 MiB | 1.083 | 0.12 | 1.200 | 1 | 1.000 | 1.200 (0.367–2.000) |" in text
    assert _medians(runs[:2]) == []  # one round: no medians table


# --------------------------------------------------------------------------- global (kvzip)


def test_global_counts_match_one_sort_of_every_entry():
    """global_counts: the top `total` of all layers' entries together, counted per (layer, head); padding
    (-inf) never counts, +inf always does."""
    from kvbound.cache.allocation import global_counts

    gen = torch.Generator().manual_seed(7)
    ranks = [torch.rand(2, 3, n, generator=gen) ** (1 + i) for i, n in enumerate((10, 14, 6))]
    ranks[1][:, 2, 9:] = float("-inf")  # a ragged head's padding
    ranks[0][:, :, :2] = float("inf")  # sinks
    counts = global_counts(ranks, 25)
    for b in range(2):
        entries = sorted(((float(r[b, h, t]), l, h) for l, r in enumerate(ranks) for h in range(3)
                          for t in range(r.shape[-1]) if r[b, h, t] > float("-inf")), reverse=True)[:25]
        want = [[sum(1 for _, l2, h2 in entries if (l2, h2) == (l, h)) for h in range(3)] for l in range(3)]
        assert [c[b].tolist() for c in counts] == want
    assert all(int(sum(c[b].sum() for c in counts)) == 25 for b in range(2))
    assert global_counts(ranks, 10**6)[1][:, 2].tolist() == [9, 9]  # everything real, no padding


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_kvzip_global_keeps_the_top_of_every_layer_and_head(name):
    """kvzip allocation=global under compress: the kept tokens of each (layer, head) are exactly those of
    one ranking of every full layer's reconstruction scores (sinks always), keep x heads x layers in all,
    and the heads really differ."""
    from kvbound.cache.context import ContextRecorder

    model, keep = tiny(name), 12
    context = ContextRecorder(model)
    kvbound.generation.prefill(model, prompt_ids(60), context, 20)
    cache = kvbound.make_cache(model, "kvzip", keep, allocation="global")
    cache.compress(context, keep)
    scores = context.shared["kvzip"]
    sinks = cache.options.sinks
    full = cache.full_layers
    heads = cache.kv_heads
    entries = sorted(((float("inf") if t < sinks else float(scores[l][0, h, t]), l, h, t)
                      for l in full for h in range(heads) for t in range(scores[l].shape[-1])), reverse=True)
    top = entries[:keep * heads * len(full)]
    counts = []
    for l in full:
        layer = cache.layers[l]
        positions = _held(layer, "positions")
        for h in range(heads):
            got = {int(p) for p in positions[0, h].tolist() if 0 <= p < 60}
            assert got == {t for _, l2, h2, t in top if (l2, h2) == (l, h)}
            counts.append(len(got))
    assert sum(counts) == keep * heads * len(full) and len(set(counts)) > 1
    assert cache.memory_report()["allocation"] == "global"
    model(prompt_ids(4, seed=3), past_key_values=cache)  # the question goes in after the ragged context


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_kvzip_global_holds_the_total_while_decoding(name):
    """Bounded: each overflowing chunk is re-ranked over every layer; decoding keeps each head's quota,
    so the total stays layers x heads x budget, ragged over layers and heads."""
    model = tiny(name)
    cache = kvbound.make_cache(model, "kvzip", 10, allocation="global")
    from kvbound.generation import prefill

    prefill(model, prompt_ids(40), cache, chunk=16)
    full = cache.full_layers
    heads = cache.kv_heads
    total = len(full) * heads * 10
    kept = cache.memory_report()["kept_tokens"]
    assert sum(sum(kept[i]) for i in full) == total
    run_greedy(model, prompt_ids(40), cache, 6)
    report = cache.memory_report()
    kept = report["kept_tokens"]
    assert sum(sum(kept[i]) for i in full) == total
    assert len({c for i in full for c in kept[i]}) > 1  # ragged over layers and heads


def test_global_is_kvzip_only():
    with pytest.raises(KVBoundError, match="allocation=global ranks the scores of every layer together, which only kvzip"):
        kvbound.make_cache(tiny("tiny-llama"), "snapkv", 16, allocation="global")
    with pytest.raises(KVBoundError, match="must be one of uniform, pyramid, ada, cake, global"):
        kvbound.make_cache(tiny("tiny-llama"), "kvzip", 16, allocation="everywhere")


@pytest.mark.parametrize("allocation", ["pyramid", "ada", "cake", "global"])
def test_kvzip_reconstructs_chunk_after_chunk_under_every_allocation(allocation):
    """A chunked prefill reconstructs after each overflowing chunk; once layers hold different counts
    (pyramid, ada's ragged heads, global), the repeat pass's mask must fit each layer (it failed for
    pyramid and ada before: the mask was built from the first layer's length)."""
    from kvbound.generation import prefill

    model = tiny("tiny-llama")
    extra = {"pyramid_beta": 4} if allocation == "pyramid" else {}
    cache = kvbound.make_cache(model, "kvzip", 10, allocation=allocation, **extra)
    prefill(model, prompt_ids(40), cache, chunk=16)
    run_greedy(model, prompt_ids(40), cache, 4)
    kept = cache.memory_report()["kept_tokens"]
    assert sum(map(sum, kept)) == len(cache.layers) * cache.kv_heads * 10
    assert cache.reconstructed_tokens > 40  # every chunk reconstructed


def test_kvzip_global_quota_follows_beams():
    """Beam search reorders kvzip's per-sequence quotas (allocation=global) with its K/V."""
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "kvzip", 5, allocation="global")
    with torch.no_grad():
        model(prompt_ids(12, seed=6, batch=2), past_key_values=cache)
    layer = cache.layers[-1]
    assert layer.quota is not None and layer.quota.shape[0] == 2
    before = layer.quota.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(layer.quota, before.flip(0))
    out = model.generate(prompt_ids(10, seed=6), past_key_values=kvbound.make_cache(model, "kvzip", 5, allocation="global"),
                         num_beams=3, max_new_tokens=4, do_sample=False)
    assert out.shape[-1] == 14


@pytest.mark.parametrize("policy", ["snapkv", "kvzip"])
@torch.no_grad()
def test_pyramid_spreads_the_compressed_keep_over_depth(policy):
    """Under kvpress's protocol, ``allocation=pyramid`` keeps PyramidKV's per-layer share of ``keep``
    (more in the bottom layers), as it does while prefilling; it once kept ``keep`` in every layer,
    the same as ``uniform``."""
    from kvbound.cache.allocation import pyramid_capacities
    from kvbound.cache.context import ContextRecorder

    model, keep = tiny("tiny-llama"), 24
    context = ContextRecorder(model)
    kvbound.generation.prefill(model, prompt_ids(60), context, 20)
    cache = kvbound.make_cache(model, policy, keep, allocation="pyramid")
    cache.compress(context, keep)
    full = cache.full_layers
    want = pyramid_capacities(keep, len(full), cache.options.pyramid_beta, 60, cache.protected_tokens())
    assert len(set(want)) > 1
    got = [sum(cache.memory_report()["kept_tokens"][l]) // cache.kv_heads for l in full]
    assert got == want
    model(prompt_ids(4, seed=3), past_key_values=cache)  # the question goes in after the context


def test_cake_refuses_the_compress_protocol():
    from kvbound.bench.ruler import check_policies
    from kvbound.cache.context import ContextRecorder

    model = tiny("tiny-llama")
    context = ContextRecorder(model)
    kvbound.generation.prefill(model, prompt_ids(40), context, 20)
    for policy in ("snapkv", "kvzip"):
        with pytest.raises(KVBoundError, match="allocation=cake sets each layer's share while prefilling"):
            kvbound.make_cache(model, policy, 16, allocation="cake").compress(context, 16)
    with pytest.raises(KVBoundError, match="CAKE sets each layer's share while prefilling"):
        check_policies(["full", "snapkv:allocation=cake"], "compress")
    check_policies(["full", "snapkv:allocation=cake"], "bounded")
