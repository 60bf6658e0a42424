"""Token scorers (expected-attention, kvzip, keydiff, knorm) against naive versions of their papers'
formulas on tiny models: same scores, same kept set; bytes reported = bytes of the tensors held;
bad options are one-line errors. (Budgets, chunked prefill + decoding, codecs, batches, beams: the
policy lists of tests/test_eviction.py and tests/test_codec_tiers.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

import kvbound
from kvbound.cache.kvzip import FIRST_PROMPT, NEXT_PROMPT
from kvbound.errors import KVBoundError
from kvbound.generation import greedy
from kvbound.models import byte_tokenizer

from conftest import FAMILIES, prompt_ids, tiny

SCORERS = ["expected-attention", "kvzip", "keydiff", "knorm"]


def full_layers(model):
    return [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"] \
        if getattr(model.config, "layer_types", None) else list(range(model.config.num_hidden_layers))


def attention_inputs(model, ids, cache):
    """Run ``model`` on ``ids`` with ``cache``; return each layer's attention input (normed hidden
    states) and position embeddings, captured by our own pre-hooks."""
    seen, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        def hook(module, args, kwargs, i=i):
            seen[i] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0], kwargs["position_embeddings"])
        handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(ids, past_key_values=cache, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    return seen


def prerope(attn, h):
    """q_proj (+ q_norm) of ``h`` [B, T, hidden] -> [B, heads, T, D], float64."""
    q = attn.q_proj(h).view(*h.shape[:-1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    return q.transpose(1, 2).double()


def rotate_half_matrix(d):
    """P with P x = rotate_half(x) = cat(-x[d/2:], x[:d/2])."""
    p = torch.zeros(d, d, dtype=torch.float64)
    p[: d // 2, d // 2:] = -torch.eye(d // 2)
    p[d // 2:, : d // 2] = torch.eye(d // 2)
    return p


def rope_cos_sin(model, layer_idx, positions, like):
    rotary = model.model.rotary_emb
    pos = torch.tensor([positions])
    try:
        return rotary(like, pos, model.config.layer_types[layer_idx])
    except (TypeError, AttributeError):
        return rotary(like, pos)


def kept_from(scores, k):
    """Kept positions [kv, k] of naive per-head scores [kv, n] (ascending)."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


# --------------------------------------------------------------------------- keydiff, knorm


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("policy", ["keydiff", "knorm"])
def test_key_scorers_keep_what_the_formula_ranks_highest(name, policy):
    model, n, budget = tiny(name), 20, 7
    if policy == "knorm" and name in ("tiny-qwen3", "tiny-gemma3"):
        pytest.skip("k_norm gives every key of the random tiny model the same norm (ties)")
    ids = prompt_ids(n)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
    cache = kvbound.make_cache(model, policy, budget)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for i in full_layers(model):
        keys = full.layers[i].keys[0].double()  # [kv, n, D]
        if policy == "knorm":
            scores = -torch.sqrt((keys ** 2).sum(-1))
        else:
            unit = keys / torch.sqrt((keys ** 2).sum(-1, keepdim=True))
            anchor = unit.mean(dim=1, keepdim=True)
            scores = -(keys * anchor).sum(-1) / (torch.sqrt((keys ** 2).sum(-1)) * torch.sqrt((anchor ** 2).sum(-1)))
        assert torch.equal(cache.layers[i].positions[0], kept_from(scores, budget)), (policy, i)


@pytest.mark.parametrize("policy", ["keydiff", "knorm"])
def test_key_scorers_need_no_query(policy, monkeypatch):
    """keydiff and knorm never project a query: they run without the query path at all."""
    from kvbound.recompute import LayerDriver

    def refuse(*args, **kwargs):
        raise AssertionError("a key-only scorer asked for a query")

    monkeypatch.setattr(LayerDriver, "query", refuse)
    monkeypatch.setattr(LayerDriver, "prerope_query", refuse)
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, policy, 6)
    greedy(model, prompt_ids(14), cache, 6, stop_at_eos=False, prefill_chunk=5)
    assert all(layer.held() == 6 for layer in cache.layers)


def test_window_option_keeps_the_newest():
    model = tiny("tiny-llama")
    cache = kvbound.make_cache(model, "knorm", 6, window=3)
    for step in range(3):
        with torch.no_grad():
            model(prompt_ids(5, seed=step), past_key_values=cache, use_cache=True)
        seen = cache.get_seq_length()
        for layer in cache.layers:
            assert torch.equal(layer.positions[..., -3:], torch.arange(seen - 3, seen).expand(1, 2, 3))


# --------------------------------------------------------------------------- expected attention


def naive_expected_logits(model, layer_idx, rows, first_row_pos, seen, keys, sinks=4, n_future=512):
    """Per query head logits [H, n] of keys [kv, n, D], from attention inputs ``rows`` [m, hidden] whose first
    row is at position ``first_row_pos``, future RoPE averaged over [seen, seen + n_future)."""
    attn = model.model.layers[layer_idx].self_attn
    skip = max(0, sinks - first_row_pos)
    q = prerope(attn, rows[None, skip:])[0]  # [H, m, D]
    mu = q.mean(1)
    cov = torch.stack([(qh - m).T @ (qh - m) / qh.shape[0] for qh, m in zip(q, mu)])
    d = q.shape[-1]
    cos, sin = rope_cos_sin(model, layer_idx, list(range(seen, seen + n_future)), rows)
    p = rotate_half_matrix(d)
    rot = torch.zeros(d, d, dtype=torch.float64)
    for c, s in zip(cos[0].double(), sin[0].double()):
        rot += torch.diag(c) + torch.diag(s) @ p
    rot /= n_future
    s = float(attn.scaling)
    groups = q.shape[0] // keys.shape[0]
    out = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.float64)
    for h in range(q.shape[0]):
        m_bar, c_bar = rot @ mu[h], rot @ cov[h] @ rot.T
        for i, k in enumerate(keys[h // groups].double()):
            out[h, i] = s * (m_bar @ k) + s * s / 2 * (k @ c_bar @ k)
    return out


def naive_expected_scores(logits, values, positions, sinks=4):
    """softmax over non-sinks per query head, mean over the group, times ||v||; sinks +inf. -> [kv, n]"""
    kv = values.shape[0]
    groups = logits.shape[0] // kv
    out = torch.zeros(kv, logits.shape[1], dtype=torch.float64)
    sink = positions < sinks
    for h in range(logits.shape[0]):
        z = torch.exp(logits[h][~sink[h // groups]]).sum()
        out[h // groups] += torch.exp(logits[h]) / z / groups
    out = out * torch.sqrt((values.double() ** 2).sum(-1))
    return out.masked_fill(sink, float("inf"))


@pytest.mark.parametrize("name", FAMILIES)
def test_expected_attention_matches_formula_in_prefill(name):
    model, n, budget = tiny(name), 24, 9
    ids = prompt_ids(n, seed=3)
    full = DynamicCache(config=model.config)
    inputs = attention_inputs(model, ids, full)
    cache = kvbound.make_cache(model, "expected-attention", budget)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for i in full_layers(model):
        keys, values = full.layers[i].keys[0], full.layers[i].values[0]
        logits = naive_expected_logits(model, i, inputs[i][0][0], 0, n, keys)
        positions = torch.arange(n).expand(keys.shape[0], n)
        kept = kept_from(naive_expected_scores(logits, values, positions), budget)
        layer = cache.layers[i]
        assert torch.equal(layer.positions[0], kept), i
        groups = logits.shape[0] // keys.shape[0]
        expect = logits.gather(1, kept.repeat_interleave(groups, 0))
        torch.testing.assert_close(layer.logits[0].double(), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3"])
def test_expected_attention_decoding_uses_the_buffer(name):
    """refresh=1: every decoding step re-scores every held key from the last ``buffer`` attention inputs."""
    model, budget, buffer = tiny(name), 8, 5
    cache = kvbound.make_cache(model, "expected-attention", budget, buffer=buffer, refresh=1, n_future=16)
    history = []
    nxt = prompt_ids(12, seed=2)
    for step in range(6):
        inputs = attention_inputs(model, nxt, cache)
        with torch.no_grad():  # the step's token: greedy from a fresh full pass is not needed; any token works
            nxt = prompt_ids(1, seed=10 + step)
        history.append(inputs)
        if step == 0:
            continue  # the prompt pass: covered by the prefill test
        seen = cache.get_seq_length()
        for i in full_layers(model):
            rows = torch.cat([h[i][0][0] for h in history], dim=0)[-buffer:]
            layer = cache.layers[i]
            keys = layer.keys[0]
            logits = naive_expected_logits(model, i, rows, seen - buffer, seen, keys, n_future=16)
            torch.testing.assert_close(layer.logits[0].double(), logits, rtol=1e-4, atol=1e-4)
            assert layer.held() == budget


def test_expected_attention_keeps_new_keys_until_the_next_scoring():
    """Between scorings (refresh) a new key is held unscored; each step evicts the lowest-scored key."""
    model, budget = tiny("tiny-llama"), 8
    cache = kvbound.make_cache(model, "expected-attention", budget, refresh=100)
    with torch.no_grad():
        model(prompt_ids(12), past_key_values=cache, use_cache=True)
        before = [(layer.logits.clone(), layer.positions.clone(), layer.values.clone()) for layer in cache.layers]
        for step in range(3):
            model(prompt_ids(1, seed=5 + step), past_key_values=cache, use_cache=True)
    for layer, (logits, positions, values) in zip(cache.layers, before):
        assert bool((layer.positions[..., -3:] == torch.arange(12, 15)).all())
        assert bool(layer.logits[..., -3:].isnan().all()) and not bool(layer.logits[..., :-3].isnan().any())
        # the 3 steps evicted, one at a time, the lowest score among the scored keys held then
        kept_pos, kept_logits, kept_values = positions[0], logits[0].double(), values[0]
        for _ in range(3):
            scores = naive_expected_scores(kept_logits, kept_values, kept_pos)
            keep = kept_from(scores, kept_pos.shape[1] - 1)
            groups = kept_logits.shape[0] // keep.shape[0]
            kept_pos, kept_values = kept_pos.gather(1, keep), kept_values.gather(1, keep[..., None].expand(-1, -1, kept_values.shape[-1]))
            kept_logits = kept_logits.gather(1, keep.repeat_interleave(groups, 0))
        assert torch.equal(layer.positions[0, :, :-3], kept_pos)


# --------------------------------------------------------------------------- kvzip


def naive_kvzip_scores(model, tok_ids, full, n, chunk, sinks=4):
    """Scores [kv, n] of every context token: for each chunk, the repeat ids through a copy of the full cache;
    softmax of the post-RoPE repeat queries over [sinks; chunk keys; repeat keys (causal)]; max over queries
    and the group."""
    first, nxt, suffix, full_ids = tok_ids
    layers = full_layers(model)
    kv = model.config.num_key_value_heads
    scores = {i: torch.zeros(kv, n, dtype=torch.float64) for i in layers}
    ctx = full_ids
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        prompt = first if a == 0 else torch.cat([nxt, ctx[:, max(0, a - 8):a]], dim=1)
        repeat = torch.cat([prompt, suffix, full_ids[:, a:b]], dim=1)
        work = copy.deepcopy(full)
        inputs = attention_inputs(model, repeat, work)
        r = repeat.shape[1]
        for i in layers:
            attn = model.model.layers[i].self_attn
            hidden, (cos, sin) = inputs[i]
            q = prerope(attn, hidden)[0]  # [H, r, D]
            p = rotate_half_matrix(q.shape[-1])
            q = q * cos[0].double() + (q @ p.T) * sin[0].double()
            keys = work.layers[i].keys[0].double()  # [kv, n + r, D]
            s = min(sinks, a)
            sub = torch.cat([keys[:, :s], keys[:, a:b], keys[:, n:]], dim=1)
            groups = q.shape[0] // kv
            for h in range(q.shape[0]):
                logits = q[h] @ sub[h // groups].T * float(attn.scaling)  # [r, s + c + r]
                causal = torch.ones(r, r, dtype=torch.bool).tril()
                logits[:, s + (b - a):] = logits[:, s + (b - a):].masked_fill(~causal, float("-inf"))
                probs = torch.softmax(logits, dim=-1)[:, s:s + (b - a)]
                scores[i][h // groups, a:b] = torch.maximum(scores[i][h // groups, a:b], probs.amax(0))
    return scores


@pytest.mark.parametrize("name", FAMILIES)
def test_kvzip_matches_reconstruction_formula(name):
    model, n, budget, chunk = tiny(name), 21, 9, 8
    ids = prompt_ids(n, seed=4)
    cache = kvbound.make_cache(model, "kvzip", budget, chunk=chunk)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    full = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=full, use_cache=True)
    naive = naive_kvzip_scores(model, (cache.first_ids, cache.next_ids, cache.suffix_ids, ids), full, n, chunk)
    for i, scores in naive.items():
        positions = torch.arange(n).expand_as(scores)
        kept = kept_from(scores.masked_fill(positions < 4, float("inf")), budget)
        layer = cache.layers[i]
        assert torch.equal(layer.positions[0], kept), i
        got = layer.scores[0].double()
        torch.testing.assert_close(got[:, 4:], scores.gather(1, kept)[:, 4:], rtol=1e-4, atol=1e-5)
    report = cache.memory_report()
    assert report["reconstruction_prompt"] == "chat template"
    assert report["reconstructed_tokens"] == sum(
        (cache.first_ids if a == 0 else cache.next_ids).shape[1] + (8 if a else 0) + cache.suffix_ids.shape[1]
        + min(chunk, n - a) for a in range(0, n, chunk))


def test_kvzip_prompts_follow_the_paper_and_the_chat_template():
    model = tiny("tiny-llama")
    tok = byte_tokenizer()
    cache = kvbound.make_cache(model, "kvzip", 8, tokenizer=tok)
    assert tok.decode(cache.first_ids[0]) == FIRST_PROMPT
    assert tok.decode(cache.next_ids[0]) == NEXT_PROMPT
    templated = tok.apply_chat_template([{"role": "user", "content": "ctx" + FIRST_PROMPT}],
                                        add_generation_prompt=True, tokenize=False)
    assert templated.endswith(FIRST_PROMPT + tok.decode(cache.suffix_ids[0]))
    plain = byte_tokenizer()
    plain.chat_template = None
    cache = kvbound.make_cache(model, "kvzip", 8, tokenizer=plain)
    assert tok.decode(cache.suffix_ids[0]) == "\n"
    assert cache.memory_report()["reconstruction_prompt"].startswith("plain text")


def test_kvzip_chunked_prefill_and_decoding():
    """Chunks within the budget score nothing; an overflowing chunk reconstructs every unscored token; decoding
    evicts the lowest score and keeps generated tokens; the peak is budget + one pass."""
    model, budget = tiny("tiny-qwen3"), 8
    cache = kvbound.make_cache(model, "kvzip", budget, chunk=4)
    with torch.no_grad():
        model(prompt_ids(6), past_key_values=cache, use_cache=True)
        assert cache.memory_report()["reconstructed_tokens"] == 0
        assert all(layer.unscored() == 6 for layer in cache.layers)
        model(prompt_ids(5, seed=2), past_key_values=cache, use_cache=True)
    assert all(layer.held() == budget and layer.unscored() == 0 for layer in cache.layers)
    assert cache.memory_report()["peak_hot_kv_bytes"] == 11 * cache.kv_bytes_per_token
    before = [(layer.scores.clone(), layer.positions.clone()) for layer in cache.layers]
    with torch.no_grad():
        for step in range(3):
            model(prompt_ids(1, seed=9 + step), past_key_values=cache, use_cache=True)
    for layer, (scores, positions) in zip(cache.layers, before):
        assert layer.held() == budget and layer.unscored() == 3
        assert bool((layer.positions[..., -3:] == torch.arange(11, 14)).all())  # generated tokens kept
        survivors = kept_from(scores[0].masked_fill(positions[0] < 4, float("inf")), budget - 3)
        assert torch.equal(layer.positions[0, :, :-3], positions[0].gather(1, survivors))  # the 3 lowest went
        assert torch.equal(layer.scores[0, :, :-3], scores[0].gather(1, survivors))
    assert cache.memory_report()["bytes_by_tier"]["token_ids"] == 8 * (3 + 8)  # unscored + the 8 before


def test_kvzip_without_a_tokenizer_is_a_clear_error():
    model = tiny("tiny-llama")
    model.config.vocab_size, vocab = 300, model.config.vocab_size
    try:
        with pytest.raises(KVBoundError, match="tokenizer") as err:
            kvbound.make_cache(model, "kvzip", 8)
        assert "\n" not in str(err.value)
    finally:
        model.config.vocab_size = vocab


# --------------------------------------------------------------------------- all four


def held_tensor_bytes(cache):
    """Bytes of every tensor the cache and its layers hold between steps, found by walking their attributes."""
    seen, total = set(), 0
    for obj in [cache, *cache.layers]:
        for value in vars(obj).values():
            if isinstance(value, torch.Tensor) and id(value) not in seen and not isinstance(value, torch.nn.Parameter):
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


@pytest.mark.parametrize("policy", SCORERS)
@pytest.mark.parametrize("codec", [None, "int4"])
def test_bytes_reported_are_the_tensors_held(policy, codec):
    model = tiny("tiny-llama")
    options = {"codec": codec} if codec else {}
    cache = kvbound.make_cache(model, policy, 7, **options)
    greedy(model, prompt_ids(20), cache, 5, stop_at_eos=False, prefill_chunk=6)
    kvzip_prompts = {"first_ids", "next_ids", "suffix_ids"}  # constants of the policy, not per-token state
    constants = sum(getattr(cache, a).numel() * 8 for a in kvzip_prompts if hasattr(cache, a))
    report = cache.memory_report()
    assert report["total_bytes"] == held_tensor_bytes(cache) - constants
    assert report["hot_kv_bytes"] == sum(layer.keys.numel() * layer.keys.element_size()
                                         + layer.values.numel() * layer.values.element_size() for layer in cache.layers)


@pytest.mark.parametrize("policy,budget,options,match", [
    ("expected-attention", 4, {}, "budget > sinks"),
    ("expected-attention", 8, {"buffer": 0}, "buffer"),
    ("expected-attention", 8, {"refresh": 0}, "refresh"),
    ("expected-attention", 8, {"n_future": 0}, "n_future"),
    ("expected-attention", 8, {"epsilon": -1.0}, "epsilon"),
    ("expected-attention", 8, {"covariance": "yes"}, "covariance"),
    ("expected-attention", 8, {"codec": "int3"}, "codec"),
    ("kvzip", 4, {}, "budget > sinks"),
    ("kvzip", 8, {"chunk": 0}, "chunk"),
    ("kvzip", 8, {"tokenizer": "gpt2"}, "tokenizer must be a tokenizer object"),
    ("kvzip", 8, {"ratio": 0.5}, "unknown option"),
    ("keydiff", 8, {"window": 9}, "window must be <= budget"),
    ("knorm", 8, {"window": -1}, "window"),
    ("knorm", 8, {"skip_layers": 2}, "valid options: ada_floor, allocation, .*, think, window"),
])
def test_bad_options_are_one_line_errors(policy, budget, options, match):
    with pytest.raises(KVBoundError, match=match) as err:
        kvbound.make_cache(tiny("tiny-llama"), policy, budget, **options)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("policy", SCORERS)
def test_registered_with_paper_and_options(policy):
    spec = kvbound.cache.get_policy(policy)
    assert not spec.exact and spec.beams and "arxiv.org/abs/" in spec.paper
    assert "codec" in spec.options.__dataclass_fields__
