"""K/V codecs: fp32, bf16 and group-wise int8/int4/int2 with real packed storage.

Integer formats follow KIVI (Liu et al. 2024, "KIVI: A Tuning-Free Asymmetric 2bit Quantization
for KV Cache"): asymmetric min-max quantization, ``x ~ code * scale + zero``, with one scale and
zero point per group of ``group`` values.

Two groupings (``axis``):

* ``"token"`` -- per token: each token's ``head_dim`` channels are split into groups of ``group``
  channels (KIVI's value cache; also the offload store's per-token records, since each token's
  record must stand alone);
* ``"channel"`` -- per channel: each channel is quantized over a block of ``group`` tokens
  (KIVI's key cache: keys have outlier *channels*, so a scale per channel keeps them from
  swamping the others). The number of tokens must be a multiple of ``group``.

Codes are packed along ``head_dim``: int4 two to a byte, int2 four to a byte, int8 one; planar
(byte ``j`` holds channels ``j, j + d/2, ...``), so unpacking is a few shifts on int64 words plus one
conversion copy per bit plane (:func:`unpack_into`). Scales
and zero points are float16 (as in KIVI's kernels). :meth:`Packed.nbytes` counts exactly the
bytes held: packed codes + scales + zero points.

Shapes: inputs are ``[batch, kv_heads, tokens, head_dim]``; every tensor of a :class:`Packed`
keeps tokens (or token blocks, ``axis="channel"``) on dim -2, so packed tensors concatenate
and slice along tokens like the K/V they encode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .base import gather_tokens

FORMATS = {"fp32": 32, "bf16": 16, "int8": 8, "int4": 4, "int2": 2}
BITS = (2, 4, 8)
META_DTYPE = torch.float16  # scales and zero points
_FP16_MAX = torch.finfo(torch.float16).max
_MIN_SCALE = 2.0 ** -14  # smallest normal float16: a constant group decodes within this of its value


def check_bits(bits: object, where: str) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise KVBoundError(f"{where}: bits must be one of 2, 4, 8, got {bits!r}")
    return int(bits)  # type: ignore[arg-type]


def check_group(group: object, head_dim: int, where: str) -> int:
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise KVBoundError(f"{where}: group must be a whole number >= 1, got {group!r}")
    if head_dim % group:
        raise KVBoundError(f"{where}: group {group} does not divide head_dim {head_dim}; "
                           f"use a divisor of {head_dim} (e.g. {math.gcd(32, head_dim)})")
    return group


def default_group(bits: int, head_dim: int) -> int:
    """int8: the whole head; int4: 32 (KIVI's default); int2: 16 -- at 2 bits a 32-value group
    costs SmolLM2 +17% perplexity, 16 costs +7% for one more bit per value (``kvbound bench --scenario quantization``, benchmarks/results/quantization).
    Each a divisor of ``head_dim``."""
    return head_dim if bits == 8 else math.gcd(16 if bits == 2 else 32, head_dim)


# --------------------------------------------------------------------------- packing


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes ``< 2**bits`` along the last dim, ``per = 8 // bits`` codes per byte, planar:
    byte ``j`` holds channels ``j, j + d/per, j + 2d/per, ...`` (lowest bits first), so each bit
    plane unpacks to one contiguous run of channels (:func:`unpack_into`)."""
    per = 8 // bits
    if per == 1:
        return codes
    if codes.shape[-1] % per:
        raise KVBoundError(f"head_dim {codes.shape[-1]} is not a multiple of {per} (needed to pack {bits}-bit codes)")
    c = codes.view(*codes.shape[:-1], per, codes.shape[-1] // per)
    out = c[..., 0, :].clone()
    for i in range(1, per):
        out |= c[..., i, :] << (bits * i)
    return out


_WORD_MASK = {2: 0x0303030303030303, 4: 0x0F0F0F0F0F0F0F0F}  # the low ``bits`` of each byte of an int64


def unpack_into(data: torch.Tensor, bits: int, out: torch.Tensor) -> torch.Tensor:
    """Write the codes of ``data`` (:func:`pack`) into ``out`` (``[..., d]``, any dtype; may be a
    strided slice). The shifts and masks run on int64 words, 8 packed bytes at a time, where ``data``
    is contiguous; each bit plane then lands in its channel run with one conversion copy."""
    per = 8 // bits
    if per == 1:
        return out.copy_(data)
    w = data.shape[-1]
    words = data.view(-1).view(torch.int64) if data.is_contiguous() and data.numel() % 8 == 0 else None
    for i in range(per):
        if words is not None:
            plane = ((words >> (bits * i) if i else words) & _WORD_MASK[bits]).view(torch.uint8).view(data.shape)
        else:
            plane = (data >> (bits * i) if i else data) & ((1 << bits) - 1)
        out[..., i * w:(i + 1) * w].copy_(plane)
    return out


def unpack(data: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes."""
    if bits == 8:
        return data
    return unpack_into(data, bits, data.new_empty((*data.shape[:-1], data.shape[-1] * 8 // bits)))


# --------------------------------------------------------------------------- packed tensors


@dataclass
class Packed:
    """Encoded K or V: packed codes (or a float cast) plus float16 scales and zero points.

    ``data`` is ``[B, H, tokens, head_dim * bits / 8]`` uint8 for integer formats, or the K/V
    itself cast to the float format. ``scale``/``zero`` are ``[B, H, tokens, head_dim / group]``
    (``axis="token"``) or ``[B, H, tokens / group, head_dim]`` (``axis="channel"``); ``None`` for
    float formats. ``oidx``/``oval`` (``axis="token"`` with outliers): per token and head, the
    ``[B, H, tokens, k]`` channels of largest magnitude (uint8 index, float16 value), kept apart
    from the quantized groups and restored exactly (to float16) on decode.
    """

    data: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    bits: int
    axis: str
    group: int
    oidx: torch.Tensor | None = None
    oval: torch.Tensor | None = None

    @property
    def tokens(self) -> int:
        return self.data.shape[-2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.zero, self.oidx, self.oval)
                   if t is not None)

    def decode(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The K/V this encodes, ``[B, H, tokens, head_dim]`` in ``dtype`` (written into ``out``, a
        tensor of that shape, when given: saves the copy of a later concatenation)."""
        if self.scale is None:
            return self.data.to(dtype) if out is None else out.copy_(self.data)
        b, h, n, w = self.data.shape
        d, g = w * 8 // self.bits, self.group
        if out is None:
            out = torch.empty((b, h, n, d), dtype=dtype, device=self.data.device)
        unpack_into(self.data, self.bits, out)  # the codes, already in ``dtype``
        if self.axis == "token":
            blocks, dim = out.view(b, h, n, d // g, g), -1
        else:
            blocks, dim = out.view(b, h, n // g, g, d), -2
        scale, zero = self.scale.to(dtype).unsqueeze(dim), self.zero.to(dtype).unsqueeze(dim)
        if self.axis == "token":  # in place over float codes (faster than addcmul broadcasting the last dim)
            blocks.mul_(scale).add_(zero)
        else:
            torch.addcmul(zero, blocks, scale, out=blocks)
        if self.oidx is not None:
            out.scatter_(-1, self.oidx.long(), self.oval.to(dtype))
        return out

    # -- token-axis operations (all return new tensors, so dropped parts are freed) ------
    def _map(self, fn, meta_fn=None) -> "Packed":
        meta_fn = meta_fn or fn
        return Packed(fn(self.data), None if self.scale is None else meta_fn(self.scale),
                      None if self.zero is None else meta_fn(self.zero), self.bits, self.axis, self.group,
                      None if self.oidx is None else fn(self.oidx), None if self.oval is None else fn(self.oval))

    def drop_front(self, n: int) -> "Packed":
        """Forget the first ``n`` tokens (a multiple of ``group`` for ``axis="channel"``)."""
        if self.axis == "channel" and self.scale is not None:
            if n % self.group:
                raise RuntimeError(f"per-channel blocks drop whole groups of {self.group} tokens, asked {n}")
            return self._map(lambda t: t[..., n:, :].clone(), lambda t: t[..., n // self.group:, :].clone())
        return self._map(lambda t: t[..., n:, :].clone())

    def gather(self, idx: torch.Tensor) -> "Packed":
        """Per-head token gather (``idx`` ``[B, H or 1, k]``); per-token encodings only."""
        if self.axis == "channel" and self.scale is not None:
            raise RuntimeError("per-channel blocks cannot be gathered token by token")

        return self._map(lambda t: gather_tokens(t, idx))

    def index_batch(self, fn) -> "Packed":
        """Apply ``fn`` (beam reorder / repeat / select along dim 0) to every tensor."""
        return self._map(fn)


def cat(parts: list[Packed]) -> Packed:
    """Concatenate encodings of consecutive token spans (same format and grouping)."""
    first = parts[0]
    if len(parts) == 1:
        return first

    def c(name):
        return None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts], dim=-2)

    return Packed(c("data"), c("scale"), c("zero"), first.bits, first.axis, first.group, c("oidx"), c("oval"))


# --------------------------------------------------------------------------- codec


def _quantize(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int, red: int):
    """float16 ``scale``/``zero`` mapping ``[lo, hi]`` onto codes ``0..qmax``, and the (float) codes."""
    zero = lo.to(META_DTYPE)
    # the scale covers [zero, hi] after zero's rounding; float16 rounding of the scale is absorbed by clamping
    scale = ((hi - zero.float()) / qmax).clamp(min=_MIN_SCALE).to(META_DTYPE)
    codes = ((blocks - zero.float().unsqueeze(red)) / scale.float().unsqueeze(red)).round_().clamp_(0, qmax)
    return scale, zero, codes


CLIP_RATIOS = tuple(1 - 0.04 * i for i in range(1, 13))  # 0.96 .. 0.52 of the min-max range


def _clip_search(blocks: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int, best):
    """Per-token groups (``red = -1``): per group, the range ``[lo, hi]`` shrunk about its middle by the
    ratio of :data:`CLIP_RATIOS` (or none) whose round trip has the least squared error -- the
    clipping search of AWQ/OmniQuant-style quantizers. At 2 bits it halves the error of SmolLM2's
    values; keys are left at min-max (clipping their extremes costs attention far more)."""
    def err(scale, zero, codes):
        return (codes * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1) - blocks).square_().sum(-1)

    best_err = err(*best)
    mid = (lo + hi) / 2
    for r in CLIP_RATIOS:
        cand = _quantize(blocks, mid - (mid - lo) * r, mid + (hi - mid) * r, qmax, -1)
        e = err(*cand)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best = tuple(torch.where(better.unsqueeze(-1) if t.dim() > better.dim() else better, c, t)
                     for c, t in zip(cand, best))
    return best


@dataclass(frozen=True)
class Codec:
    """A K/V format: ``fmt`` in :data:`FORMATS`; ``group`` values share a scale (integer formats)."""

    fmt: str
    group: int = 0  # 0 for float formats
    outliers: int = 0  # per-token encodings: channels of largest magnitude kept apart in float16 (per token, head)
    clip: bool = False  # per-token encodings: search each group's clipping range (:func:`_clip_search`)

    @property
    def bits(self) -> int:
        return FORMATS[self.fmt]

    @property
    def lossless(self) -> bool:
        return self.fmt == "fp32"

    @property
    def is_int(self) -> bool:
        return self.fmt.startswith("int")

    def encode(self, x: torch.Tensor, axis: str = "token") -> Packed:
        """Encode ``x`` ``[B, H, n, D]`` (``axis="channel"``: ``n`` a multiple of ``group``)."""
        if not self.is_int:
            dtype = torch.float32 if self.fmt == "fp32" else torch.bfloat16
            return Packed(x.to(dtype) if x.dtype != dtype else x.clone(), None, None, self.bits, axis, 0)
        b, h, n, d = x.shape
        g = self.group
        xf = x.float()
        if axis == "token":
            blocks, red = xf.view(b, h, n, d // g, g), -1
        elif axis == "channel":
            if n % g:
                raise RuntimeError(f"per-channel encoding needs a multiple of {g} tokens, got {n}")
            blocks, red = xf.view(b, h, n // g, g, d), -2
        else:
            raise ValueError(f"axis must be 'token' or 'channel', got {axis!r}")
        oidx = oval = None
        if self.outliers and axis == "token":
            top = xf.abs().topk(self.outliers, dim=-1).indices
            oidx, oval = top.to(torch.uint8), xf.gather(-1, top).to(META_DTYPE)
            xf = xf.scatter(-1, top, 0.0)  # the outliers no longer stretch their group's range
            blocks = xf.view(b, h, n, d // g, g)
        qmax = (1 << self.bits) - 1
        lo, hi = blocks.amin(dim=red), blocks.amax(dim=red)
        if bool(lo.abs().max() > _FP16_MAX) or bool(hi.abs().max() > _FP16_MAX):
            raise KVBoundError(f"{self.fmt} codec: K/V values beyond float16 range ({_FP16_MAX:.0f}); use fp32 or bf16")
        scale, zero, codes = _quantize(blocks, lo, hi, qmax, red)
        if self.clip and axis == "token":
            scale, zero, codes = _clip_search(blocks, lo, hi, qmax, (scale, zero, codes))
        codes = codes.to(torch.uint8).view(b, h, n, d)
        return Packed(pack(codes, self.bits), scale, zero, self.bits, axis, g, oidx, oval)

    def roundtrip(self, x: torch.Tensor, axis: str = "token") -> torch.Tensor:
        return self.encode(x, axis).decode(x.dtype)

    # -- per-token bytes (the offload store) -------------------------------------------------
    def token_bytes(self, head_dim: int) -> int:
        """Bytes one token of one head takes in :meth:`to_bytes` (exact: codes + scales + zero points)."""
        if not self.is_int:
            return head_dim * self.bits // 8
        return (head_dim * self.bits // 8 + 2 * (head_dim // self.group) * META_DTYPE.itemsize
                + self.outliers * (1 + META_DTYPE.itemsize))

    def to_bytes(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, n, D]`` -> ``[B, H, n, token_bytes]`` uint8: each token's encoding stands alone
        (per-token groups), so a store can keep, slice and reorder it like K/V of another width."""
        if x.shape[-2] == 0:
            return torch.empty((*x.shape[:-1], self.token_bytes(x.shape[-1])), dtype=torch.uint8, device=x.device)
        p = self.encode(x, "token")
        parts = [t.contiguous().view(torch.uint8) for t in (p.data, p.scale, p.zero, p.oidx, p.oval) if t is not None]
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def from_bytes(self, raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """Inverse of :meth:`to_bytes`: ``[B, H, n, token_bytes]`` uint8 -> ``[B, H, n, D]`` in ``dtype``
        (written into ``out`` when given)."""
        if not self.is_int:
            x = raw.contiguous().view(torch.float32 if self.fmt == "fp32" else torch.bfloat16)
            return x.to(dtype) if out is None else out.copy_(x)
        k = self.outliers
        w = raw.shape[-1] - k * (1 + META_DTYPE.itemsize)
        g_bytes = 2 * META_DTYPE.itemsize  # scale + zero point per group
        d = w * 8 * self.group // (self.bits * self.group + 8 * g_bytes)  # w = d*bits/8 + (d/group)*g_bytes
        c, m = d * self.bits // 8, (d // self.group) * META_DTYPE.itemsize
        scale = raw[..., c:c + m].contiguous().view(META_DTYPE)
        zero = raw[..., c + m:c + 2 * m].contiguous().view(META_DTYPE)
        oidx = raw[..., c + 2 * m:c + 2 * m + k] if k else None
        oval = raw[..., c + 2 * m + k:].contiguous().view(META_DTYPE) if k else None
        return Packed(raw[..., :c], scale, zero, self.bits, "token", self.group, oidx, oval).decode(dtype, out)


def parse_codec(name: object, head_dim: int, group: int | None = None, where: str = "codec",
                outliers: int = 0) -> Codec:
    """``fp32``/``bf16``/``int8``/``int4``/``int2`` (+ ``group``, default :func:`default_group`;
    ``outliers`` channels per token kept apart, see :class:`Packed`)."""
    if name not in FORMATS:
        raise KVBoundError(f"{where}: unknown format {name!r}; valid: {', '.join(FORMATS)}")
    fmt = str(name)
    if isinstance(outliers, bool) or not isinstance(outliers, int) or not 0 <= outliers < min(head_dim, 256):
        raise KVBoundError(f"{where}: outliers must be a whole number of channels in 0..{min(head_dim, 256) - 1}, "
                           f"got {outliers!r}")
    if not fmt.startswith("int"):
        if group is not None or outliers:
            raise KVBoundError(f"{where}: group and outliers apply to the integer formats (int8/int4/int2), not {fmt}")
        return Codec(fmt)
    bits = FORMATS[fmt]
    g = default_group(bits, head_dim) if group is None else check_group(group, head_dim, where)
    if head_dim % (8 // bits):
        raise KVBoundError(f"{where}: head_dim {head_dim} is not a multiple of {8 // bits} ({fmt} packs "
                           f"{8 // bits} codes per byte)")
    return Codec(fmt, g, outliers)


def int_codec(bits: object, head_dim: int, group: int | None, where: str, outliers: int = 0) -> Codec:
    """The integer codec for ``bits`` in :data:`BITS`, with a checked ``group``."""
    return parse_codec(f"int{check_bits(bits, where)}", head_dim, group, where, outliers)


# --------------------------------------------------------------------------- codec'd tiers


@dataclass
class CodecOptions:
    """Options of a tier that can keep its K/V through a codec (the offload store, the eviction
    policies' hot window). Any format but fp32 makes the tier lossy."""

    codec: str | None = None  # fp32/bf16/int8/int4/int2; default: K/V as the model computes them
    codec_group: int | None = None  # integer codecs: channels per scale (default: the head for int8, else 32)
    codec_outliers: int = 0  # integer codecs: per token, channels of largest magnitude kept in float16


def tier_codec(options: Any, model, policy: str) -> Codec | None:
    """The codec ``options`` (a :class:`CodecOptions`) ask for, checked against ``model``'s head_dim."""
    from .model_info import head_dim

    if options.codec is None:
        if options.codec_group is not None or options.codec_outliers:
            raise KVBoundError(f"{policy} options codec_group/codec_outliers apply to an integer codec; "
                               "add codec=int8 (or int4/int2)")
        return None
    return parse_codec(options.codec, head_dim(model), options.codec_group, f"{policy} option codec",
                       options.codec_outliers)


def encode_kv(codec: Codec | None, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K/V as a codec'd tier holds them: unchanged, or each token's codec bytes (``[B, H, n, width]``
    uint8, :meth:`Codec.to_bytes`), which slice, gather and reorder along tokens like K/V."""
    if codec is None:
        return keys, values
    return codec.to_bytes(keys), codec.to_bytes(values)


def decode_kv(codec: Codec | None, keys: torch.Tensor, values: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`encode_kv`."""
    if codec is None:
        return keys, values
    return codec.from_bytes(keys, dtype), codec.from_bytes(values, dtype)
