"""kvbound's one native kernel: attention over integer-coded K/V records (``coded_attention.c``).

PyTorch has no attention that reads int8/int4/int2 K/V, so the quantized caches (``kivi``, ``offload``
with a codec) had to dequantize into a float buffer before attending (writing as many float bytes as
an fp32 cache reads). The C kernel reads the codes in place (:class:`Coded`: the offload store's
records, KIVI's per-channel keys and per-token values), dequantizes in registers, dots each key with
the query rows of its KV head and keeps flash attention's online softmax, so a decoding step reads
only the coded bytes.

The source is compiled once per machine with the system C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``; about a second) into ``$KVBOUND_HOME/kernels/`` and loaded with :mod:`ctypes`. A block's
tokens are split into ranges run on ``torch.get_num_threads()`` OpenMP threads -- PyTorch's own pool,
since the library binds to the OpenMP runtime PyTorch loaded -- whose partial results the caller
merges by log-sum-exp. Without a compiler (or with
``KVBOUND_KERNELS=0``) :func:`available` is ``False`` and callers use their PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("coded_attention.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-std=c11", "-ffp-contract=fast")  # contract: a*b+c as one FMA
# tried in this order, each dropped where the compiler refuses it: -march=native, and OpenMP (PyTorch's own
# runtime at run time: same soname, already loaded)
OPTIONAL = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
MIN_SPLIT = 1024  # tokens per thread below which a block is not split
MAX_PARTS = 64  # token ranges per call at most (coded_attention.c's MAX_PARTS)
# Query rows per KV head up to which the kernel is used instead of dequantizing into a buffer + PyTorch's
# flash attention: decoding steps and short speculative verifications, not prefill chunks. SmolLM2's shapes,
# 4096 int8 tokens, one thread (kvbound bench --scenario kernel-rows, benchmarks/results/quantization/kernel-rows): kernel /
# dequantize 0.34 at 3 rows, 0.88 at 12, 0.84 at 24, 1.60 at 48; 12 keeps a margin below a noisy crossover.
MAX_ROWS = 12


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    return cc if cc else next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)


def _cpu_id() -> str:
    """What ``-march=native`` depends on: this CPU's model and feature flags (Linux) or its name."""
    try:
        with open("/proc/cpuinfo") as f:
            return "".join(sorted({line for line in f if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor()


def _build(cc: str, target: Path) -> None:
    """Compile :data:`SOURCE` into ``target`` (atomically: a half-written library is never loaded)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem, suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        errors: list[str] = []
        for extra in OPTIONAL:
            run = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"],
                                 capture_output=True, text=True, timeout=120)
            if run.returncode == 0:
                os.replace(tmp, target)
                return
            errors = run.stderr.strip().splitlines()[-1:] or [f"exit status {run.returncode}"]
        raise RuntimeError(f"{cc} failed: {errors[0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("KVBOUND_KERNELS", "1") == "0":
        return None
    from ..models import home  # kvbound's cache folder

    cc = _compiler()
    if cc is None:
        warnings.warn("kvbound: no C compiler found (set CC); quantized caches (kivi, codec'd offload) dequantize "
                      "into a buffer before attention (slower)", RuntimeWarning, stacklevel=3)
        return None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *FLAGS, platform.machine(), _cpu_id()]).encode())
    target = home() / "kernels" / f"coded_attention-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(cc, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(f"kvbound: could not build its C kernel ({exc}); quantized caches (kivi, codec'd offload) "
                      "dequantize into a buffer before attention (slower)", RuntimeWarning, stacklevel=3)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.kvb_coded_attention.restype = ctypes.c_int
    lib.kvb_coded_attention.argtypes = [ptr, i64, i64, i64, i64, i64, ctypes.POINTER(_CodedC), ctypes.POINTER(_CodedC),
                                        ctypes.c_int, i64, i64, i64, ctypes.c_float, ctypes.c_float, ptr, ptr, ptr, i64]
    lib.kvb_scratch_floats.restype = i64
    lib.kvb_scratch_floats.argtypes = [i64, i64]
    return lib


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def applies(like: torch.Tensor, bits: int) -> bool:
    """Whether the kernel can attend for a step whose K/V are like ``like`` ``[B, H, T, D]``: CPU
    float32, a head_dim the packing of ``bits``-bit codes fits in whole vectors, a compiler."""
    return (like.device.type == "cpu" and like.dtype == torch.float32 and like.shape[-1] % (8 * (8 // bits)) == 0
            and available())


def may_fall_back(like: torch.Tensor, sliding_window: int | None) -> bool:
    """Whether a step the kernel applies to may still dequantize a block into a buffer (which then
    counts as transient memory): several new tokens (a prefill chunk, or masks hiding part of a block
    from some of them) or a sliding-window layer."""
    return like.shape[-2] > 1 or sliding_window is not None


def pays(query: torch.Tensor, kv_heads: int) -> bool:
    """Whether the kernel beats decoding + PyTorch's attention for ``query`` ``[B, heads, T, D]``: up to
    :data:`MAX_ROWS` query rows per KV head (decoding steps, short verifications; not prefill chunks)."""
    return query.shape[1] // kv_heads * query.shape[2] <= MAX_ROWS


class _CodedC(ctypes.Structure):
    """``Coded`` in ``coded_attention.c`` (pointers and strides in bytes)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("codes", "scale", "zero")] + \
               [(name, ctypes.c_int64) for name in ("sb", "sh", "st", "msb", "msh", "mst", "group", "per_channel")]


@dataclass
class Coded:
    """K or V as the kernel reads them: ``codes`` ``[B, H, n, head_dim * bits / 8]`` uint8 (each token's
    codes contiguous, :func:`kvbound.cache.codec.pack`), and float16 ``scale``/``zero`` (any tensor
    viewing them, e.g. the bytes of a record) of one layout: ``[B, H, n, head_dim / group]`` per token, or
    ``[B, H, n / group, head_dim]`` per channel (blocks of ``group`` tokens: KIVI's keys)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group: int
    per_channel: bool = False

    @classmethod
    def records(cls, records: torch.Tensor, bits: int, group: int, head_dim: int) -> "Coded":
        """Views into records ``[B, H, n, bytes]`` of :meth:`kvbound.cache.codec.Codec.to_bytes`: codes,
        then the float16 scales and zero points (then any outliers, which the kernel finds after them)."""
        width, meta = head_dim * bits // 8, 2 * (head_dim // group)
        return cls(records[..., :width], records[..., width:width + meta], records[..., width + meta:width + 2 * meta],
                   group)

    def _c(self, shape: tuple[int, int, int], head_dim: int, bits: int) -> _CodedC:
        """The C view, after checking that every byte the kernel reads for ``[B, H, n]`` tokens is here."""
        def strides(t: torch.Tensor) -> list[int]:
            return [t.stride(i) * t.element_size() for i in range(3)]

        b, h, n = shape
        rows = -(-n // self.group) if self.per_channel else n
        meta = 2 * (head_dim if self.per_channel else head_dim // max(self.group, 1))  # bytes per scale row
        if self.codes.dtype != torch.uint8 or self.codes.stride(-1) != 1 or self.scale.stride(-1) != 1 \
                or strides(self.scale) != strides(self.zero) or self.codes.device.type != "cpu":
            raise ValueError("coded_attention takes CPU uint8 codes and scales/zero points of one layout, "
                             "each token's (or block's) contiguous")
        if tuple(self.codes.shape) != (b, h, n, head_dim * bits // 8) or self.group < 1 or (
                tuple(self.scale.shape[:3]) != (b, h, rows) or self.scale.shape[-1] * self.scale.element_size() != meta
                or self.zero.shape != self.scale.shape):
            raise ValueError(f"coded_attention: codes {tuple(self.codes.shape)} / scales {tuple(self.scale.shape)} "
                             f"do not hold {n} tokens of head_dim {head_dim} at {bits} bits, group {self.group}")
        return _CodedC(self.codes.data_ptr(), self.scale.data_ptr(), self.zero.data_ptr(), *strides(self.codes),
                       *strides(self.scale), self.group, int(self.per_channel))


def coded_attention(query: torch.Tensor, keys: Coded, values: Coded, bits: int, scaling: float,
                    softcap: float | None = None, outliers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Attention of ``query`` ``[B, H*groups, T, D]`` (float32, CPU) over the coded ``keys`` and
    ``values`` (``[B, H, n, ...]``, :class:`Coded`), every key visible to every query. ``outliers``:
    offload records with outlier channels (:meth:`Coded.records`; their tokens are dequantized first).

    Returns one ``(out [B, H*groups, T, D], lse [B, H*groups, T])`` per thread's token range, to be
    merged by log-sum-exp (:func:`kvbound.attention.merge`). Call only where :func:`available`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("kvbound's C kernel is not available (check kernels.available() first)")
    if query.dtype != torch.float32 or query.device.type != "cpu":
        raise ValueError("coded_attention takes float32 CPU queries")
    q = query.contiguous()
    b, hq, t, d = q.shape
    h, n = keys.codes.shape[1], keys.codes.shape[2]
    if hq % h:
        raise ValueError(f"coded_attention: {hq} query heads cannot share {h} KV heads")
    k, v = keys._c((b, h, n), d, bits), values._c((b, h, n), d, bits)
    groups = hq // h
    parts = max(1, min(torch.get_num_threads(), n // MIN_SPLIT, MAX_PARTS))
    floats = lib.kvb_scratch_floats(d, groups * t)
    out = torch.empty((parts, *q.shape), dtype=torch.float32)
    lse = torch.empty((parts, b, hq, t), dtype=torch.float32)
    scratch = torch.empty(parts * floats, dtype=torch.float32)
    code = lib.kvb_coded_attention(q.data_ptr(), b, h, groups, t, d, ctypes.byref(k), ctypes.byref(v), bits, outliers,
                                   n, parts, scaling, softcap or 0.0, out.data_ptr(), lse.data_ptr(),
                                   scratch.data_ptr(), floats)
    if code:
        raise RuntimeError(f"coded_attention: kernel refused bits={bits} key group={keys.group} value group="
                           f"{values.group} head_dim={d} (code {code})")
    return list(zip(out.unbind(0), lse.unbind(0)))


def attend_if_pays(query: torch.Tensor, keys: Coded, values: Coded, bits: int, scaling: float,
                   softcap: float | None = None, outliers: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """:func:`coded_attention` where the kernel :func:`pays` for ``query``; ``None`` otherwise (the
    caller dequantizes and uses PyTorch's attention): what a :class:`kvbound.attention.LazyBlock`'s
    ``attend`` returns."""
    if not pays(query, keys.codes.shape[1]):
        return None
    return coded_attention(query, keys, values, bits, scaling, softcap, outliers)
