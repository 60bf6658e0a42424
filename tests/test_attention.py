"""Tiered attention (kvbound.attention): blockwise attention merged by log-sum-exp equals plain
attention over the concatenated keys."""

import pytest
import torch

from kvbound import attention
from kvbound.attention import tiered_attention

from conftest import prompt_ids, tiny


def reference(query, keys, values, visible, scaling, softcap=None, sinks=None):
    """Plain attention over the concatenation: [B, H, T, D] output and per-key probabilities."""
    groups = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1).double()
    v = values.repeat_interleave(groups, dim=1).double()
    logits = query.double() @ k.transpose(-1, -2) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        probs = torch.cat([logits, sink], -1).softmax(-1)[..., :-1]
    else:
        probs = logits.softmax(-1)
    return (probs @ v).float(), probs.float()


def sliding_mask(t, total, window):
    """Query i (position total - t + i) sees keys j with i_pos - window < j <= i_pos."""
    q = torch.arange(total - t, total)[:, None]
    k = torch.arange(total)[None, :]
    return ((k <= q) & (k > q - window)).view(1, 1, t, total)


def causal_mask(t, total):
    return sliding_mask(t, total, total + 1)


def split(keys, values, cuts):
    edges = [0, *cuts, keys.shape[-2]]
    return [(keys[..., a:b, :], values[..., a:b, :]) for a, b in zip(edges[:-1], edges[1:])]


CASES = [  # (heads, kv_heads, t, total, cuts, window)
    (4, 2, 1, 40, [], None),  # decode, GQA, no old block
    (4, 2, 1, 40, [13], None),
    (9, 3, 1, 70, [10, 33, 50], None),  # several blocks
    (4, 4, 5, 40, [7, 20], None),  # MHA, a multi-token step (causal in the last block)
    (4, 2, 6, 30, [4, 9], 8),  # sliding: later queries see only part of the old blocks
    (4, 1, 3, 25, [20], 4),  # sliding: the oldest block is invisible to every query
]


@pytest.mark.parametrize("heads,kv_heads,t,total,cuts,window", CASES)
@pytest.mark.parametrize("explicit", [False, True])
def test_merged_blocks_equal_attention_over_the_concatenation(heads, kv_heads, t, total, cuts, window, explicit):
    g = torch.Generator().manual_seed(total + t)
    q = torch.randn(2, heads, t, 16, generator=g)
    k = torch.randn(2, kv_heads, total, 16, generator=g)
    v = torch.randn(2, kv_heads, total, 16, generator=g)
    n_hot = total - (cuts[-1] if cuts else 0)
    assert n_hot >= t
    mask = causal_mask(t, total) if window is None else sliding_mask(t, total, window)
    softcap = 5.0 if explicit else None  # softcapping takes the explicit path
    ref, _ = reference(q, k, v, mask, 0.3, softcap)
    blocks = split(k, v, cuts)
    hot_k, hot_v = blocks.pop()
    out, mass = tiered_attention(q, blocks, hot_k, hot_v, mask, 0.3, softcap)
    assert mass is None
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if window is None and t == 1:  # transformers passes no mask when every key is visible
        out, _ = tiered_attention(q, blocks, hot_k, hot_v, None, 0.3, softcap)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if window is None:  # an additive float mask means the same
        fmask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        out, _ = tiered_attention(q, blocks, hot_k, hot_v, fmask, 0.3, softcap)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_no_mask_multi_token_step_is_causal():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g), torch.randn(1, 2, 6, 8, generator=g)
    ref, _ = reference(q, k, v, causal_mask(6, 6), 0.5)
    torch.testing.assert_close(tiered_attention(q, [], k, v, None, 0.5)[0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("cuts", [[], [6]])
@pytest.mark.parametrize("softcap,block_bytes", [(None, attention.MASS_BLOCK_BYTES), (5.0, 2 * 4 * 4 * 14)])
def test_mass_is_the_probability_the_newest_queries_give_each_key(rows, cuts, softcap, block_bytes, monkeypatch):
    """Summed and per query; the second case scores 1-2 query rows per block (blocks of the
    reused logits buffer, a short last block) on the explicit softcapped path."""
    monkeypatch.setattr(attention, "MASS_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(rows)
    q = torch.randn(1, 4, 5, 16, generator=g)
    k = torch.randn(1, 2, 20, 16, generator=g)
    v = torch.randn(1, 2, 20, 16, generator=g)
    mask = causal_mask(5, 20)
    sinks = torch.randn(4, generator=g)
    ref, probs = reference(q, k, v, mask, 0.25, softcap, sinks=sinks)
    blocks = split(k, v, cuts)
    hot_k, hot_v = blocks.pop()
    old = sum(b[0].shape[-2] for b in blocks)
    want = probs[:, :, -rows:, old:].reshape(1, 2, 2, rows, -1).sum(2)  # [B, kv_heads, rows, n]
    for per_query in (False, True):
        out, mass = tiered_attention(q, blocks, hot_k, hot_v, mask, 0.25, softcap, sinks=sinks, mass_rows=rows,
                                     per_query=per_query)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mass, want if per_query else want.sum(2), rtol=1e-5, atol=1e-6)


def test_plain_calls_fall_back_to_sdpa():
    """A model switched to "kvbound" computes exactly what sdpa computes when no tiers are handed over."""
    model = tiny("tiny-gemma3")
    ids = prompt_ids(12)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids).logits
        assert attention.enable(model)
        try:
            assert model.config._attn_implementation == "kvbound"
            assert torch.equal(model(ids).logits, ref)
        finally:
            model.set_attn_implementation("sdpa")


class _Module(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("kv_heads,groups,masked", [(2, 7, False), (2, 7, True), (3, 3, True), (1, 4, False)])
def test_one_query_row_attends_its_group_as_query_rows(dtype, tol, kv_heads, groups, masked):
    """decode_gqa (one query row, the group's heads folded into query rows) equals naive attention
    over repeated K/V, with transformers' bool mask or none; "kvbound" returns it in sdpa's layout."""
    torch.manual_seed(0)
    q = torch.randn(2, kv_heads * groups, 1, 16, dtype=dtype)
    k, v = torch.randn(2, kv_heads, 37, 16, dtype=dtype), torch.randn(2, kv_heads, 37, 16, dtype=dtype)
    mask = (torch.rand(2, 1, 1, 37) > 0.4) if masked else None
    out = attention.decode_gqa(_Module(groups), q, k, v, mask, scaling=0.25)
    ref, _ = reference(q.float(), k.float(), v.float(), mask, 0.25)
    assert out.shape == (2, 1, kv_heads * groups, 16) and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=tol, atol=tol)
    via, _ = attention.attend_step(_Module(groups), q, k, v, mask, None, scaling=0.25)
    assert torch.equal(via, out)


def test_decode_gqa_leaves_other_calls_to_sdpa():
    """Several query rows, no groups, a softcap or sinks: not folded (None)."""
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    assert attention.decode_gqa(_Module(2), q, k, k, None) is not None
    assert attention.decode_gqa(_Module(2), torch.randn(1, 4, 3, 8), k, k, None) is None
    assert attention.decode_gqa(_Module(1), torch.randn(1, 2, 1, 8), k, k, None) is None
    assert attention.decode_gqa(_Module(2), q, k, k, None, softcap=30.0) is None
    assert attention.decode_gqa(_Module(2), q, k, k, None, s_aux=torch.zeros(4)) is None


@pytest.mark.parametrize("policy", ["offload", "residual", "kv-direct"])
def test_bf16_exact_policies_match_full_token_for_token(policy):
    """Below float32 the tiers are concatenated (one rounding, as `full`'s attention): merging
    bf16-rounded block outputs flipped a greedy token on tiny-llama at budget 16 (39/40 matched)."""
    import kvbound
    from kvbound.generation import greedy
    from kvbound.tiny import build_tiny

    model = build_tiny("tiny-llama", attn_implementation="sdpa").to(torch.bfloat16)
    ids = prompt_ids(60)
    ref = greedy(model, ids, kvbound.make_cache(model, "full"), 40, stop_at_eos=False)
    cache = kvbound.make_cache(model, policy, budget=16)
    try:
        assert greedy(model, ids, cache, 40, stop_at_eos=False).tolist() == ref.tolist()
    finally:
        cache.close()
