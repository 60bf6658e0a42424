"""kvbound's C kernel (attention over integer-coded K/V records) against decode + PyTorch's attention."""

import os
import warnings

import pytest
import torch

import kvbound
from kvbound import attention, kernels
from kvbound.cache.codec import parse_codec
from kvbound.errors import KVBoundError
from conftest import prompt_ids, run_greedy, tiny

needs_kernel = pytest.mark.skipif(not kernels.available(), reason="no C compiler on this machine")


def _reference(query, keys, values, codec, scaling, softcap=None):
    k, v = codec.from_bytes(keys, torch.float32), codec.from_bytes(values, torch.float32)
    return attention.block_attention(query, k, v, None, scaling, softcap)


def _records(codec, keys, values, d):
    return (kernels.Coded.records(x, codec.bits, codec.group, d) for x in (keys, values))


def _merged(parts):
    lse = torch.logsumexp(torch.stack([p[1] for p in parts]), dim=0)
    return attention.merge(parts), lse


@needs_kernel
@pytest.mark.parametrize("fmt,group,outliers", [
    ("int8", None, 0),  # one scale per token and head: the offload default, codes read in place
    ("int8", 16, 0),  # several groups, read in place
    ("int4", None, 0),  # 4-bit planes, read in place
    ("int2", 8, 0),
    ("int8", 4, 0),  # groups narrower than a vector: dequantized first
    ("int8", 16, 3),  # outlier channels restored (dequantized first)
    ("int4", 16, 2),
])
@pytest.mark.parametrize("heads,kv_heads,queries", [(9, 3, 1), (4, 4, 1), (8, 2, 3), (6, 1, 2)])
def test_matches_decoding_then_attending(fmt, group, outliers, heads, kv_heads, queries):
    torch.manual_seed(0)
    d, n = 64, 77  # n: two whole tiles and a partial one
    codec = parse_codec(fmt, d, group, outliers=outliers)
    query = torch.randn(2, heads, queries, d)
    k, v = torch.randn(2, kv_heads, n, d) * 2, torch.randn(2, kv_heads, n, d)
    keys, values = codec.to_bytes(k), codec.to_bytes(v)
    parts = kernels.coded_attention(query, *_records(codec, keys, values, d), codec.bits, 0.125,
                                    outliers=codec.outliers)
    out, lse = _merged(parts)
    ref, ref_lse = _reference(query, keys, values, codec, 0.125)
    # float rounding only (summation order, scales folded into probabilities): far below a codec step
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-6)


@needs_kernel
@pytest.mark.parametrize("bits,group", [(4, 32), (2, 16), (8, 64), (4, 8)])
@pytest.mark.parametrize("parts", [1, 3])  # 3 token ranges: ranges (and tiles) start inside key blocks
def test_kivi_layout_per_channel_keys(bits, group, parts, monkeypatch):
    """KIVI's tensors as they are held: keys per channel over blocks of ``group`` tokens, values per token."""
    torch.manual_seed(2)
    n = 320
    monkeypatch.setattr(kernels, "MIN_SPLIT", n // parts)
    monkeypatch.setattr(torch, "get_num_threads", lambda: parts)
    d = 64
    codec = parse_codec(f"int{bits}", d, group)
    query = torch.randn(1, 9, 1, d)
    k, v = torch.randn(1, 3, n, d) * 2, torch.randn(1, 3, n, d)
    pk, pv = codec.encode(k, "channel"), codec.encode(v, "token")
    keys = kernels.Coded(pk.data, pk.scale, pk.zero, group, per_channel=True)
    values = kernels.Coded(pv.data, pv.scale, pv.zero, group)
    parts_out = kernels.coded_attention(query, keys, values, bits, 0.125)
    assert len(parts_out) == parts
    out, lse = _merged(parts_out)
    ref, ref_lse = attention.block_attention(query, pk.decode(torch.float32), pv.decode(torch.float32), None, 0.125)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-6)


@needs_kernel
def test_softcap_strided_records_and_threads(monkeypatch):
    """Records read in place from a store-like layout ``[2, B, H, seg, width]`` (slices of a larger
    segment), Gemma 2's logit softcapping, and a token range split over two threads."""
    torch.manual_seed(1)
    d, seg, n = 32, 300, 250
    codec = parse_codec("int8", d)
    kv = torch.stack([codec.to_bytes(torch.randn(1, 2, seg, d) * 3) for _ in range(2)])  # [2, B, H, seg, width]
    keys, values = kv[0, :, :, 20:20 + n], kv[1, :, :, 20:20 + n]
    assert not keys.is_contiguous()
    query = torch.randn(1, 4, 1, d) * 3
    monkeypatch.setattr(kernels, "MIN_SPLIT", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parts = kernels.coded_attention(query, *_records(codec, keys, values, d), 8, d ** -0.5, softcap=5.0)
    finally:
        torch.set_num_threads(threads)
    assert len(parts) == 2
    out, lse = _merged(parts)
    ref, ref_lse = _reference(query, keys, values, codec, d ** -0.5, softcap=5.0)
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-6, rtol=1e-6)


@needs_kernel
def test_empty_range_and_bad_arguments():
    codec = parse_codec("int8", 16)
    empty = codec.to_bytes(torch.zeros(1, 1, 0, 16))
    (out, lse), = kernels.coded_attention(torch.randn(1, 2, 1, 16), *_records(codec, empty, empty, 16), 8, 0.25)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    rec = codec.to_bytes(torch.randn(1, 1, 4, 16))
    with pytest.raises(ValueError, match="float32 CPU queries"):
        kernels.coded_attention(torch.randn(1, 2, 1, 16, dtype=torch.float64), *_records(codec, rec, rec, 16), 8, 0.25)
    with pytest.raises(ValueError, match="at 3 bits"):
        kernels.coded_attention(torch.randn(1, 2, 1, 16), *_records(codec, rec, rec, 16), 3, 0.25)
    k = kernels.Coded(rec, rec, torch.cat([rec, rec], -1)[..., :rec.shape[-1]], 16)  # unlike the scales' layout
    with pytest.raises(ValueError, match="scales/zero points of one layout"):
        kernels.coded_attention(torch.randn(1, 2, 1, 16), k, k, 8, 0.25)
    k, v = _records(codec, rec, rec, 16)
    with pytest.raises(ValueError, match="do not hold 4 tokens of head_dim 16 at 4 bits"):  # int8 records read as int4
        kernels.coded_attention(torch.randn(1, 2, 1, 16), k, v, 4, 0.25)
    k.group = 8
    with pytest.raises(ValueError, match="group 8"):  # one scale per token stored, two claimed
        kernels.coded_attention(torch.randn(1, 2, 1, 16), k, v, 8, 0.25)
    with pytest.raises(ValueError, match="3 query heads cannot share"):
        kernels.coded_attention(torch.randn(1, 3, 1, 16), *_records(codec, rec.expand(1, 2, 4, -1),
                                                                     rec.expand(1, 2, 4, -1), 16), 8, 0.25)


def _spy(monkeypatch) -> list:
    calls = []
    real = kernels.coded_attention
    monkeypatch.setattr(kernels, "coded_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _same_steps(model, fused, plain, ids, steps=5):
    """Greedy steps of two caches: the same tokens, logits within float rounding."""
    with torch.no_grad():
        a, b = (model(ids, past_key_values=c).logits[:, -1] for c in (fused, plain))
        for _ in range(steps):
            nxt = b.argmax(-1, keepdim=True)
            assert torch.equal(a.argmax(-1, keepdim=True), nxt)
            a, b = (model(nxt, past_key_values=c).logits[:, -1] for c in (fused, plain))
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@needs_kernel
@pytest.mark.parametrize("name,fmt", [("tiny-llama", "int8"), ("tiny-qwen3", "int4"), ("tiny-gemma3", "int8")])
def test_offload_decodes_through_the_kernel(name, fmt, monkeypatch):
    """``offload codec=int8`` steps read the store with the kernel (counted), and give the same tokens,
    with logits within float rounding, as decoding the records first (``kernel=False``)."""
    calls = _spy(monkeypatch)
    model = tiny(name)
    fused = kvbound.make_cache(model, "offload", 5, codec=fmt)
    plain = kvbound.make_cache(model, "offload", 5, codec=fmt, kernel=False)
    _same_steps(model, fused, plain, prompt_ids(24))
    assert calls, "the kernel never ran"
    assert not fused.exact
    fused.close(), plain.close()


@needs_kernel
@pytest.mark.parametrize("name,bits", [("tiny-llama", 4), ("tiny-qwen3", 8), ("tiny-gemma3", 4), ("tiny-mha", 4)])
def test_kivi_decodes_through_the_kernel(name, bits, monkeypatch):
    """kivi's quantized blocks are read by the kernel while decoding (counted): same tokens and logits
    within float rounding as dequantizing them (``kernel=False``), the same bytes held."""
    calls = _spy(monkeypatch)
    model = tiny(name)
    fused = kvbound.make_cache(model, "kivi", bits=bits, residual=4)
    plain = kvbound.make_cache(model, "kivi", bits=bits, residual=4, kernel=False)
    _same_steps(model, fused, plain, prompt_ids(40), steps=20)  # blocks quantized during decoding too
    assert calls, "the kernel never ran"
    assert fused.bytes_by_tier() == plain.bytes_by_tier()


@needs_kernel
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_kernel_shares_pytorchs_openmp_runtime():
    """The library's OpenMP calls bind to the runtime PyTorch loaded: one OpenMP library in the process."""
    kernels._library()
    with open("/proc/self/maps") as f:
        runtimes = {line.split()[-1] for line in f if "libgomp" in line or "libomp" in line or "libiomp" in line}
    assert len(runtimes) <= 1, runtimes


def test_kernel_option_is_checked():
    with pytest.raises(KVBoundError, match="offload option kernel must be true or false"):
        kvbound.make_cache(tiny("tiny-llama"), "offload", 4, codec="int8", kernel="yes")
    with pytest.raises(KVBoundError, match="kivi option kernel must be true or false"):
        kvbound.make_cache(tiny("tiny-llama"), "kivi", kernel=1)


def test_without_a_compiler_offload_decodes_instead(monkeypatch, tmp_path):
    """No C compiler: one warning, and ``codec=int8`` offload still runs (decoding its records)."""
    monkeypatch.setenv("KVBOUND_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    kernels._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build its C kernel"):
            assert not kernels.available()
        model = tiny("tiny-llama")
        cache = kvbound.make_cache(model, "offload", 5, codec="int8")
        out = run_greedy(model, prompt_ids(20), cache, 6)
        assert len(out) == 6
        cache.close()
    finally:
        kernels._library.cache_clear()


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("KVBOUND_KERNELS", "0")
    kernels._library.cache_clear()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert not kernels.available()
    finally:
        kernels._library.cache_clear()
