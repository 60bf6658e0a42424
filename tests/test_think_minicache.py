"""ThinK key-channel pruning (``think``, ``think=`` on the eviction policies) and MiniCache
(``minicache``): naive references of the formulas, bytes held, bad options, chunked prefill, decoding."""

import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import kvbound
from kvbound.cache.base import nbytes
from kvbound.cache.channels import channel_scores, choose_channels, kept_channels
from kvbound.cache.minicache import MergedLayer, retained_count, slerp_merge
from kvbound.errors import KVBoundError

from conftest import FAMILIES, prompt_ids, tiny

EVICTING = ["streaming", "h2o", "tova", "snapkv"]


def forward(model, cache, ids):
    with torch.no_grad():
        return model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)


def run_steps(model, cache, prompt, chunk, steps):
    """Prefill ``prompt`` in chunks of ``chunk`` tokens, then decode ``steps`` tokens; yields after each pass."""
    nxt = None
    for start in range(0, prompt.shape[1], chunk):
        nxt = forward(model, cache, prompt[:, start:start + chunk])
        yield
    for _ in range(steps):
        nxt = forward(model, cache, nxt)
        yield


def window_queries(model, ids, layer_idx, rows):
    """Naive post-RoPE queries of the last ``rows`` tokens of ``ids`` at ``layer_idx`` (a hook on the
    attention module's input, then q_proj, the optional q_norm and RoPE as the model applies them)."""
    seen = {}
    attn = model.model.layers[layer_idx].self_attn

    def hook(module, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    handle = attn.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids, past_key_values=kvbound.make_cache(model, "full"), use_cache=True)
    handle.remove()
    h = seen["h"][:, -rows:]
    q = attn.q_proj(h).view(*h.shape[:-1], -1, attn.head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q = attn.q_norm(q)
    cos, sin = seen["pe"]
    q, _ = apply_rotary_pos_emb(q.transpose(1, 2), q.transpose(1, 2), cos[..., -rows:, :], sin[..., -rows:, :])
    return q.detach()


def naive_channels(query, keys, ratio):
    """ThinK's kept channels, loop by loop: score_c = mean_g ||Q_g[:, c]|| * ||K[:, c]||."""
    b, heads, _, d = query.shape
    kv = keys.shape[1]
    g = heads // kv
    keep = d - math.floor(ratio * d)
    out = torch.empty(b, kv, keep, dtype=torch.long)
    for bi in range(b):
        for h in range(kv):
            scores = []
            for c in range(d):
                k_norm = math.sqrt(sum(float(x) ** 2 for x in keys[bi, h, :, c]))
                q_norms = [math.sqrt(sum(float(x) ** 2 for x in query[bi, h * g + j, :, c])) for j in range(g)]
                scores.append(sum(q * k_norm for q in q_norms) / g)
            top = sorted(range(d), key=lambda c: -scores[c])[:keep]
            out[bi, h] = torch.tensor(sorted(top))
    return out


# --------------------------------------------------------------------------- ThinK


def test_channel_scores_match_the_formula():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8, generator=gen), torch.randn(2, 2, 9, 8, generator=gen)
    scores = channel_scores(q, k)
    for b in range(2):
        for h in range(2):
            for c in range(8):
                want = sum(float(q[b, 2 * h + j, :, c].norm()) for j in range(2)) / 2 * float(k[b, h, :, c].norm())
                assert scores[b, h, c].item() == pytest.approx(want, rel=1e-5)
    assert torch.equal(choose_channels(q, k, 0.5), naive_channels(q, k, 0.5))
    assert [kept_channels(64, r) for r in (0.5, 0.4, 0.01, 0.99)] == [32, 39, 64, 1]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mha"])
def test_think_alone_keeps_every_token_and_the_naive_channels(name):
    model, n, window, ratio = tiny(name), 40, 6, 0.5
    ids = prompt_ids(n)
    full = kvbound.make_cache(model, "full")
    forward(model, full, ids)
    cache = kvbound.make_cache(model, "think", ratio=ratio, window=window)
    forward(model, cache, ids)
    for i, (layer, ref) in enumerate(zip(cache.layers, full.layers)):
        channels = naive_channels(window_queries(model, ids, i, window), ref.keys, ratio)
        assert torch.equal(layer.channels, channels)
        idx = channels.unsqueeze(2).expand(-1, -1, n - window, -1)
        assert torch.equal(layer.pruned_keys, ref.keys[:, :, :n - window].gather(-1, idx))
        assert torch.equal(layer.keys, ref.keys[:, :, n - window:])  # the window keeps full keys
        assert torch.equal(layer.values, ref.values)  # V untouched
        held_k, _ = layer.with_new(ref.keys[:, :, :0], ref.values[:, :, :0])  # what attention reads: zero-filled
        q = torch.randn(1, 1, 1, held_k.shape[-1])
        pruned_dot = (q.squeeze()[channels[0, 0]] * layer.pruned_keys[0, 0]).sum(-1)  # q[kept] . k[kept]
        assert torch.allclose((q.squeeze() * held_k[0, 0, :n - window]).sum(-1), pruned_dot, atol=1e-6)


def think_held(cache):
    """Bytes of the tensors the layers hold, by what they are."""
    keys = sum(nbytes(getattr(layer, "pruned_keys", None), layer.keys) for layer in cache.layers)
    values = sum(nbytes(layer.values) for layer in cache.layers)
    channels = sum(nbytes(getattr(layer, "channels", None)) for layer in cache.layers)
    return keys, values, channels


@pytest.mark.parametrize("policy", ["think", *EVICTING])
@pytest.mark.parametrize("name", FAMILIES)
def test_think_bytes_are_the_tensors_held_chunked_and_decoding(name, policy):
    model = tiny(name)
    budget, opts = (None, {"ratio": 0.5, "window": 4}) if policy == "think" else (40, {"think": 0.5})
    if policy == "snapkv":  # ThinK's window is snapkv's; the others' is 32
        budget, opts["window"] = 20, 4
    cache = kvbound.make_cache(model, policy, budget, **opts)
    chosen = None
    for _ in run_steps(model, cache, prompt_ids(50), 13, 8):
        keys, values, channels = think_held(cache)
        tiers = cache.bytes_by_tier()
        assert tiers["hot_kv"] == keys + values and tiers["channels"] == channels
        full_layers = [layer for layer in cache.layers if not layer.is_sliding]
        if chosen is None and full_layers[0].channels is not None:
            chosen = [layer.channels.clone() for layer in full_layers]
        if chosen is not None:  # chosen once, kept
            assert all(torch.equal(c, layer.channels) for c, layer in zip(chosen, full_layers))
        for layer in full_layers:
            held = layer.held()
            assert held == layer.positions.shape[-1] == layer.values.shape[-2] == layer.past_visible()
            assert layer.keys.shape[-2] == min(held, layer.think_window) and layer.keys._base is None
            if budget is not None:
                assert held <= budget
    assert chosen is not None and cache.get_seq_length() == 58


@pytest.mark.parametrize("policy", ["snapkv", "h2o", "knorm", "keydiff"])
def test_think_prunes_the_kept_keys_of_a_scorer(policy):
    """A prompt in one pass: the scorer keeps the same tokens as without ThinK, and ThinK keeps the
    naive channels of those kept keys (the older ones pruned, the newest ``window`` at full width)."""
    model, ids, budget = tiny("tiny-llama"), prompt_ids(60), 40
    extra = {"snapkv": {"window": 4}, "h2o": {"recent": 8}}.get(policy, {"window": 4})
    plain = kvbound.make_cache(model, policy, budget, **extra)
    forward(model, plain, ids)
    thin = kvbound.make_cache(model, policy, budget, think=0.5, **extra)
    forward(model, thin, ids)
    w = thin.layers[0].think_window
    for i, (a, b) in enumerate(zip(thin.layers, plain.layers)):
        assert torch.equal(a.positions, b.positions) and torch.equal(a.values, b.values)
        assert torch.equal(a.channels, naive_channels(window_queries(model, ids, i, w), b.keys, 0.5))
        idx = a.channels.unsqueeze(2).expand(-1, -1, budget - w, -1)
        assert torch.equal(a.pruned_keys, b.keys[:, :, :budget - w].gather(-1, idx))
        assert torch.equal(a.keys, b.keys[:, :, budget - w:])
    d = plain.layers[0].keys.shape[-1]
    ratio = ((budget - w) * kept_channels(d, 0.5) + w * d) / (budget * d)
    assert think_held(thin)[0] == ratio * sum(nbytes(layer.keys) for layer in plain.layers)


def test_think_alone_holds_under_080x_full():
    model, ids = tiny("tiny-llama"), prompt_ids(200)
    full, thin = kvbound.make_cache(model, "full"), kvbound.make_cache(model, "think", ratio=0.5, window=8)
    forward(model, full, ids)
    forward(model, thin, ids)
    assert thin.memory_report()["hot_kv_bytes"] <= 0.80 * full.memory_report()["hot_kv_bytes"]


def test_think_bad_options():
    model = tiny("tiny-llama")
    for ratio in (0, 1, 1.5, -0.1, "half", True, None):
        with pytest.raises(KVBoundError, match="ratio"):
            kvbound.make_cache(model, "think", ratio=ratio)
    for ratio in (0, 1, 2.0, "x"):
        with pytest.raises(KVBoundError, match="think"):
            kvbound.make_cache(model, "snapkv", 16, think=ratio)
    with pytest.raises(KVBoundError, match="codec"):
        kvbound.make_cache(model, "h2o", 16, think=0.5, codec="int8")
    with pytest.raises(KVBoundError, match="budget"):
        kvbound.make_cache(model, "think", 16)
    with pytest.raises(KVBoundError, match="window"):
        kvbound.make_cache(model, "think", window=0)


# --------------------------------------------------------------------------- MiniCache


def test_slerp_matches_the_formula():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 5, 8, generator=gen)
    b[0, 0, 0] = 2.5 * a[0, 0, 0]  # parallel: the linear limit
    e, na, nb, dist = slerp_merge(a, b, 0.6)
    for idx in [(0, 0, 0), (0, 1, 2), (1, 2, 4)]:
        x, y = a[idx].tolist(), b[idx].tolist()
        nx, ny = math.sqrt(sum(v * v for v in x)), math.sqrt(sum(v * v for v in y))
        ux, uy = [v / nx for v in x], [v / ny for v in y]
        omega = math.acos(max(-1.0, min(1.0, sum(p * q for p, q in zip(ux, uy)))))
        if math.sin(omega) < 1e-6:
            want = [0.4 * p + 0.6 * q for p, q in zip(ux, uy)]
        else:
            want = [(math.sin(0.4 * omega) * p + math.sin(0.6 * omega) * q) / math.sin(omega) for p, q in zip(ux, uy)]
        assert e[idx].tolist() == pytest.approx(want, abs=2e-3 if omega < 1e-2 else 1e-5)
        assert na[idx].item() == pytest.approx(nx, rel=1e-5) and nb[idx].item() == pytest.approx(ny, rel=1e-5)
        assert dist[idx].item() == pytest.approx(omega / math.pi, abs=2e-3 if omega < 1e-2 else 1e-6)
    assert torch.allclose(e.norm(dim=-1), torch.ones(2, 3, 5), atol=1e-5)  # SLERP of unit vectors is unit
    assert [retained_count(m, 0.05) for m in (0, 9, 10, 33, 92, 100)] == [0, 0, 1, 2, 5, 5]


def naive_restore(a, b, t, retain):
    """MiniCache on one chunk, token by token: merged tokens e*|x|, the top-`retain` by mean angular distance exact."""
    bsz, heads, m, _ = a.shape
    keep = int(retain * m + 0.5)
    outs = [a.clone(), b.clone()]
    for bi in range(bsz):
        dists = []
        for tok in range(m):
            d = 0.0
            for h in range(heads):
                x, y = a[bi, h, tok], b[bi, h, tok]
                d += math.acos(max(-1.0, min(1.0, float((x / x.norm()) @ (y / y.norm()))))) / math.pi / heads
            dists.append(d)
        retained = set(sorted(range(m), key=lambda i: -dists[i])[:keep])
        for tok in range(m):
            if tok in retained:
                continue
            for h in range(heads):
                x, y = a[bi, h, tok], b[bi, h, tok]
                omega = math.acos(max(-1.0, min(1.0, float((x / x.norm()) @ (y / y.norm())))))
                e = (math.sin((1 - t) * omega) * x / x.norm() + math.sin(t * omega) * y / y.norm()) / math.sin(omega)
                outs[0][bi, h, tok], outs[1][bi, h, tok] = e * x.norm(), e * y.norm()
    return outs, sorted(retained)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mha"])
def test_minicache_prompt_matches_the_naive_merge(name):
    model, n, window = tiny(name), 60, 8
    ids = prompt_ids(n)
    full = kvbound.make_cache(model, "full")
    forward(model, full, ids)
    cache = kvbound.make_cache(model, "minicache", window=window, start=1)
    forward(model, cache, ids)
    assert cache.pairs == [(1, 2)]
    assert torch.equal(cache.layers[0].keys, full.layers[0].keys)  # below start: unchanged
    m = n - window
    for kind, store in (("keys", cache.layers[1].stores[0]), ("values", cache.layers[1].stores[1])):
        a, b = getattr(full.layers[1], kind), getattr(full.layers[2], kind)
        (want_a, want_b), retained = naive_restore(a[:, :, :m], b[:, :, :m], 0.6, 0.05)
        assert store.tokens == m and store.retained_pos[0].tolist() == retained
        assert torch.allclose(store.restore(0), want_a, atol=1e-5) and torch.allclose(store.restore(1), want_b, atol=1e-5)
        for layer, ref in ((cache.layers[1], a), (cache.layers[2], b)):
            assert torch.equal(getattr(layer, kind), ref[:, :, m:])  # the hot window stays exact


def minicache_held(cache):
    total = 0
    for layer in cache.layers:
        total += nbytes(layer.keys, layer.values)
        if isinstance(layer, MergedLayer) and layer.side == 1:
            for s in layer.stores:
                total += nbytes(s.direction, *s.norms, *s.retained, s.retained_pos)
    return total


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen3", "tiny-mha"])
def test_minicache_bytes_are_the_tensors_held_chunked_and_decoding(name):
    model, window = tiny(name), 5
    cache = kvbound.make_cache(model, "minicache", window=window, start=0)
    for _ in run_steps(model, cache, prompt_ids(40), 11, 25):
        report = cache.memory_report()
        assert report["total_bytes"] == minicache_held(cache)
        assert sum(sum(d.values()) for d in report["bytes_by_layer"]) == report["total_bytes"]
        seen = cache.get_seq_length()
        for first, second in cache.pairs:
            a, b = cache.layers[first], cache.layers[second]
            hot = a.keys.shape[-2]
            assert hot == b.keys.shape[-2] == a.values.shape[-2] and hot <= 2 * window
            for store in a.stores:
                assert store.tokens + hot == seen
                assert store.direction.shape[-2] + store.retained_pos.shape[-1] == store.tokens
                assert store.retained[0].shape[-2] == store.retained_pos.shape[-1]
    assert cache.get_seq_length() == 65


def test_minicache_saves_bytes_and_runs_a_batch():
    model, ids = tiny("tiny-llama"), prompt_ids(120, batch=2)
    full, mini = kvbound.make_cache(model, "full"), kvbound.make_cache(model, "minicache", start=0, window=8)
    forward(model, full, ids)
    forward(model, mini, ids)
    assert mini.pairs == [(0, 1)]  # 3 layers: the last one unpaired
    pair = sum(sum(d.values()) for d in mini.memory_report()["bytes_by_layer"][:2])
    assert pair <= 0.62 * sum(nbytes(layer.keys, layer.values) for layer in full.layers[:2])  # ~0.54 + the window
    assert mini.memory_report()["hot_kv_bytes"] <= 0.75 * full.memory_report()["hot_kv_bytes"]


def test_minicache_bad_options():
    model = tiny("tiny-llama")
    layers = model.config.num_hidden_layers
    for start in (-1, layers, 2.5, "x", True):
        with pytest.raises(KVBoundError, match="start"):
            kvbound.make_cache(model, "minicache", start=start)
    with pytest.raises(KVBoundError, match="option t "):
        kvbound.make_cache(model, "minicache", t=1.5)
    with pytest.raises(KVBoundError, match="retain"):
        kvbound.make_cache(model, "minicache", retain=1)
    with pytest.raises(KVBoundError, match="window"):
        kvbound.make_cache(model, "minicache", window=0)
    with pytest.raises(KVBoundError, match="budget"):
        kvbound.make_cache(model, "minicache", 16)
    with pytest.raises(KVBoundError, match="nothing to merge"):
        kvbound.make_cache(tiny("tiny-gemma3"), "minicache")


@pytest.mark.parametrize("policy, options", [("think", {"ratio": 0.5, "window": 4}), ("snapkv", {"think": 0.5, "window": 4}),
                                             ("minicache", {"window": 4, "start": 0})])
def test_reset_forgets_everything(policy, options):
    model, ids = tiny("tiny-llama"), prompt_ids(30)
    budget = 12 if policy == "snapkv" else None
    fresh, reused = kvbound.make_cache(model, policy, budget, **options), kvbound.make_cache(model, policy, budget, **options)
    forward(model, reused, prompt_ids(25, seed=5))
    reused.reset()
    assert reused.memory_report()["total_bytes"] == 0
    assert forward(model, fresh, ids).tolist() == forward(model, reused, ids).tolist()
    assert fresh.memory_report()["bytes_by_tier"] == reused.memory_report()["bytes_by_tier"]
