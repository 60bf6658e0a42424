"""K/V codecs: round-trip error bounds, packed sizes, record layout, bad input."""

import pytest
import torch

from kvbound.cache.codec import Codec, cat, int_codec, pack, parse_codec, unpack, unpack_into
from kvbound.errors import KVBoundError

B, H, N, D = 2, 3, 64, 32


def kv(seed: int = 0, outlier: float = 0.0) -> torch.Tensor:
    x = torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(seed))
    if outlier:
        x[..., 5] *= outlier  # one outlier channel, as keys have
    return x


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    codes = torch.randint(0, 1 << bits, (B, H, N, D), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (B, H, N, D * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("axis", ["token", "channel"])
@pytest.mark.parametrize("bits,group", [(8, 32), (4, 16), (4, 32), (2, 8), (2, 32)])
def test_roundtrip_error_within_half_a_step(bits, group, axis):
    x = kv(1)
    p = Codec(f"int{bits}", group).encode(x, axis)
    y = p.decode(torch.float32)
    # half a quantization step of the group's range, plus float16 rounding of scale and zero point
    g = x.view(B, H, N, D // group, group) if axis == "token" else x.view(B, H, N // group, group, D)
    red = -1 if axis == "token" else -2
    rng = (g.amax(red) - g.amin(red)).unsqueeze(red) / ((1 << bits) - 1)
    err = (y.view(g.shape) - g).abs()
    assert bool((err <= 0.5 * rng * (1 + 2e-3) + 2e-3 * g.abs().amax(red, keepdim=True) + 1e-6).all())
    assert err.max() > 0  # really lossy
    # error shrinks with bits: 8-bit is far more precise than 2-bit
    if bits == 8:
        assert err.max() < 0.02


def test_float_formats():
    x = kv(2)
    assert torch.equal(Codec("fp32").roundtrip(x), x)
    y = Codec("bf16").roundtrip(x)
    assert torch.allclose(y, x, rtol=2 ** -8, atol=0) and not torch.equal(y, x)
    assert Codec("bf16").encode(x).nbytes() == x.numel() * 2


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("axis", ["token", "channel"])
def test_packed_sizes_exact(bits, axis):
    group = 16
    p = Codec(f"int{bits}", group).encode(kv(), axis)
    codes = B * H * N * D * bits // 8
    groups = B * H * N * D // group
    assert p.data.numel() == codes and p.data.dtype == torch.uint8
    assert p.nbytes() == codes + 2 * groups * 2  # float16 scale and zero point per group


def test_per_channel_handles_outlier_channel_better_than_per_token():
    x = kv(3, outlier=20.0)
    c = Codec("int2", 32)
    others = [i for i in range(D) if i != 5]  # per token, the outlier widens its neighbours' range
    err_channel = (c.roundtrip(x, "channel") - x)[..., others].pow(2).mean()
    err_token = (c.roundtrip(x, "token") - x)[..., others].pow(2).mean()
    assert err_channel < 0.2 * err_token


def test_cat_drop_gather_match_encoding_the_whole():
    x = kv(4)
    c = Codec("int4", 16)
    whole = c.encode(x, "channel")
    parts = cat([c.encode(x[..., :32, :], "channel"), c.encode(x[..., 32:, :], "channel")])
    assert torch.equal(parts.decode(torch.float32), whole.decode(torch.float32))
    assert torch.equal(whole.drop_front(16).decode(torch.float32), whole.decode(torch.float32)[..., 16:, :])
    tok = c.encode(x, "token")
    idx = torch.tensor([0, 5, 63]).view(1, 1, 3)
    assert torch.equal(tok.gather(idx).decode(torch.float32), tok.decode(torch.float32)[..., [0, 5, 63], :])


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4", "int2"])
def test_token_bytes_roundtrip(fmt):
    x = kv(5)
    c = parse_codec(fmt, D)
    raw = c.to_bytes(x)
    assert raw.shape == (B, H, N, c.token_bytes(D)) and raw.dtype == torch.uint8
    assert torch.equal(c.from_bytes(raw, torch.float32), c.roundtrip(x))
    # a slice of tokens decodes on its own (the offload store reads spans)
    assert torch.equal(c.from_bytes(raw[..., 10:20, :], torch.float32), c.roundtrip(x)[..., 10:20, :])


def test_int8_token_is_about_a_quarter_of_fp32():
    c = parse_codec("int8", 64)
    assert c.token_bytes(64) == 64 + 4  # codes + float16 scale and zero point (one group: the head)
    assert parse_codec("fp32", 64).token_bytes(64) / c.token_bytes(64) > 3.7


def test_outlier_channels_kept_apart_lower_the_error_of_the_rest():
    x = kv(7, outlier=20.0)
    plain, kept = Codec("int2", 32), Codec("int2", 32, outliers=2)
    err_plain = (plain.roundtrip(x) - x).pow(2).mean()
    err_kept = (kept.roundtrip(x) - x).pow(2).mean()
    assert err_kept < 0.5 * err_plain
    p = kept.encode(x)
    assert p.nbytes() == plain.encode(x).nbytes() + B * H * N * 2 * 3  # uint8 index + float16 value each
    y = p.decode(torch.float32)
    top = (x.abs() >= x.abs().topk(2, dim=-1).values[..., -1:])  # the 2 largest channels of each token
    assert torch.equal(y[top], x[top].half().float())  # kept exact to float16
    assert top[..., 5].float().mean() > 0.9  # mostly the outlier channel
    raw = kept.to_bytes(x)
    assert raw.shape[-1] == kept.token_bytes(D) and torch.equal(kept.from_bytes(raw, torch.float32), y)


@pytest.mark.parametrize("bits", [0, 1, 3, 16, "4", True, None])
def test_bad_bits(bits):
    with pytest.raises(KVBoundError, match="bits must be one of 2, 4, 8"):
        int_codec(bits, 64, None, "kivi")


@pytest.mark.parametrize("group", [3, 48, 0, -8, 2.5])
def test_bad_group(group):
    with pytest.raises(KVBoundError, match="group"):
        int_codec(4, 64, group, "kivi")


def test_bad_format():
    with pytest.raises(KVBoundError, match="unknown format"):
        parse_codec("int3", 64)
    with pytest.raises(KVBoundError, match="group and outliers apply"):
        parse_codec("bf16", 64, 32)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_into_float_slices_word_and_byte_paths(bits):
    codes = torch.randint(0, 1 << bits, (B, H, N, D), dtype=torch.uint8)
    packed = pack(codes, bits)
    out = torch.zeros(B, H, N + 5, D)
    unpack_into(packed, bits, out[..., 2:N + 2, :])  # contiguous: unpacked on int64 words
    assert torch.equal(out[..., 2:N + 2, :], codes.float()) and not out[..., :2, :].any()
    odd = pack(codes[..., :3, :], bits)  # a strided slice of it below: unpacked byte by byte
    assert torch.equal(unpack_into(odd[:, :, ::2], bits, torch.empty(B, H, 2, D)), codes[:, :, :3:2].float())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_clip_search_never_worse_than_min_max(bits):
    x = kv(5, outlier=6.0)
    minmax, clipped = Codec(f"int{bits}", 16), Codec(f"int{bits}", 16, clip=True)
    e0 = (minmax.roundtrip(x) - x).view(B, H, N, D // 16, 16).square().sum(-1)
    e1 = (clipped.roundtrip(x) - x).view(B, H, N, D // 16, 16).square().sum(-1)
    assert bool((e1 <= e0 * (1 + 1e-5) + 1e-7).all())  # per group: min-max is one of the candidates
    if bits == 2:
        assert e1.sum() < 0.85 * e0.sum()  # and at 2 bits, on Gaussian data, clearly better
    # keys (per channel) ignore it: their extremes matter most to attention
    assert torch.equal(clipped.roundtrip(x, "channel"), minmax.roundtrip(x, "channel"))


def test_default_groups_by_bits():
    from kvbound.cache.codec import default_group

    assert (default_group(2, 64), default_group(4, 64), default_group(8, 64)) == (16, 32, 64)
    assert (default_group(2, 8), default_group(4, 48)) == (8, 16)
