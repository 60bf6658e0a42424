"""``offload``: exact bounded-memory cache that moves old K/V out of the hot tier.

The most recent ``budget`` tokens' K/V stay hot (see
:class:`~kvbound.cache.hot_window.HotWindowLayer`); K/V of older tokens are written to an
offload store and read back exactly, layer by layer, whenever attention needs them -- the
classic KV offloading of FlexGen (Sheng et al. 2023) and TriForce's (Sun et al. 2024) exact tier.

Stores (option ``store``):

* ``file`` (default on CPU): one append-only file per layer inside a private temp folder per
  cache (``dir`` picks its parent), reserved a segment at a time (``fallocate``: a full disk fails
  on the write, with a clear error). Writes are ``pwrite``s, one per KV head (copies into the shared
  mapping were tried: see docs/batching.md). The folder is
  deleted by :meth:`OffloadCache.close`, on garbage collection and at interpreter exit (Ctrl-C
  included; a ``kill -9`` cannot be caught).
* ``host`` (default on GPU): pinned host memory, copied back to the GPU per layer.

Reads (option ``read``, file store): ``mmap`` (default) maps each segment once; attention reads
the mapped pages in place (kvbound's tiered attention, :mod:`kvbound.attention`: no copy, no
concatenation) and the pages are dropped from the process (``madvise(MADV_DONTNEED)``) right
after each layer's attention, so a mapped span counts in RSS only while its layer attends.
``pread`` reads the span into a buffer reused by every layer of a forward pass and freed at its
end (one copy). What each costs was measured by a script since folded into ``kvbound bench --scenario decode``
(``git show 79a3f1f:benchmarks/results/tiered-attention.md``).

Layout: head-major segments ``[2, batch, kv_heads, SEGMENT, head_dim]``, so each head's keys (and
values) of consecutive tokens are contiguous and a span is at most one block per segment. Gemma 3
sliding layers never need tokens older than the window: their store is a ring of
``window - 1 + max_rollback`` slots (one segment).

Option ``codec`` (``int8``, ``int4``, ``int2``, ``bf16``, ``fp32``; :mod:`kvbound.cache.codec`) stores
each spilled token as its codec bytes -- per-token groups of ``codec_group`` channels with float16
scales, so every record still stands alone -- and decodes what it reads back: int8 reads and stores
~3.8x fewer bytes than fp32 and makes the cache lossy (``cache.exact`` is then ``False``).

Memory report: ``hot_kv`` (held in memory), ``offloaded`` (bytes of the tokens in the store) and
``offload_slack`` (capacity allocated beyond them: the file is preallocated and the host buffer
grown geometrically, so ``offloaded + offload_slack`` is the file size / buffer size); the
mapped span or read-back buffer plus the hot + new K/V handed to attention are transient bytes.

Beam search and batch reordering rewrite the records (each segment holds every sequence): in place for a reorder, a full read-back and rewrite when the batch size changes.
A model on a GPU may use the file store too: records are copied to host memory first.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from .. import attention, kernels
from ..errors import KVBoundError
from .base import KVBoundCache, kv_bytes, nbytes
from .codec import CodecOptions, decode_kv, encode_kv, tier_codec
from .model_info import layer_windows
from .hooks import use_tiered_attention
from .hot_window import HotWindowLayer
from .registry import register

STORES = ("auto", "file", "host")
READS = ("mmap", "pread")
SEGMENT = 4096  # tokens per file segment (rounded up to whole pages); one attention block each
DECODE_CHUNK = SEGMENT  # codec'd stores: tokens decoded per attention block, into one reused buffer


@dataclass
class OffloadOptions(CodecOptions):
    dir: str | None = None  # parent folder of the store's temp folder (file store); default: system temp
    store: str = "auto"  # "file", "host" (pinned host memory) or "auto" (file on CPU, host on GPU)
    max_rollback: int = 64  # sliding layers keep this many tokens beyond the window for rollback
    read: str = "mmap"  # file store: "mmap" (attention reads the mapped file in place) or "pread" (a copy)
    kernel: bool = True  # integer codec: attend to the records with kvbound's C kernel (kvbound.kernels)


def _disk_error(exc: OSError, where: str, need: int) -> KVBoundError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return KVBoundError(f"offload store is out of disk space in {where} (writing {need} bytes); "
                            "free space or pass the offload option dir=<folder on a larger disk>")
    return KVBoundError(f"offload store cannot write in {where}: {exc.strerror or exc}")


def _remove_store(fds: list[int], folder: str | None) -> None:
    """Finalizer: close the layer files and delete the cache's folder (never touches the cache)."""
    while fds:
        try:
            os.close(fds.pop())
        except OSError:
            pass
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


class _Store:
    """K/V of one layer, head-major: segment ``s`` is ``[2, batch, kv_heads, seg, head_dim]``.

    Token ``p`` lives at slot ``p`` (append-only) or ``p % ring`` (a ring of one segment), slot
    ``i`` at index ``i % seg`` of segment ``i // seg``. Within a segment each head's keys (and
    values) of consecutive tokens are contiguous, so attention reads a span in place.
    """

    def __init__(self, ring: int | None, seg: int) -> None:
        self.ring = ring
        self.seg_tokens = seg
        self.seg = ring if ring is not None else seg
        self.start = 0  # oldest position still stored (ring) ...
        self.end = 0  # ... and one past the newest
        self.shape: tuple[int, int, int] | None = None  # (batch, kv_heads, head_dim)
        self.dtype: torch.dtype | None = None
        self.record = 0  # bytes per token (K and V)

    def nbytes(self) -> int:
        """Bytes of the tokens stored (live records)."""
        return (self.end - self.start) * self.record

    def allocated_bytes(self) -> int:
        """Bytes of backing capacity actually allocated (file size, host buffer): >= :meth:`nbytes`."""
        return 0

    def chunks(self, start: int, end: int) -> list[tuple[int, int, int, int]]:
        """``(segment, index, offset in the span, count)`` runs of tokens ``start .. end``."""
        out, pos = [], start
        while pos < end:
            slot = pos if self.ring is None else pos % self.ring
            seg, idx = divmod(slot, self.seg)
            n = min(end - pos, self.seg - idx)
            out.append((seg, idx, pos - start, n))
            pos += n
        return out

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens ``start .. start+n`` (must continue the store: ``start == end``)."""
        if start != self.end:
            raise RuntimeError(f"offload store: spill at {start} does not continue the store at {self.end}")
        end = start + keys.shape[-2]
        self._write_records(start, keys, values)
        self.end = end
        if self.ring is not None:
            self.start = max(self.start, end - self.ring)

    def _write_records(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write tokens ``start .. start+n`` at their slots (new or rewritten)."""
        if self.shape is None:
            b, h, _, d = keys.shape
            self.shape, self.dtype = (b, h, d), keys.dtype
            self.record = 2 * b * h * d * keys.element_size()
            if self.ring is None:  # whole pages per segment, so each segment can be mapped on its own
                step = mmap.ALLOCATIONGRANULARITY // math.gcd(self.record, mmap.ALLOCATIONGRANULARITY)
                self.seg = -(-self.seg_tokens // step) * step
        end = start + keys.shape[-2]
        first = start if self.ring is None else max(start, end - self.ring)
        if first < end:
            cut = first - start
            for seg, idx, off, n in self.chunks(first, end):
                self._put(seg, idx, keys[..., cut + off:cut + off + n, :], values[..., cut + off:cut + off + n, :])

    def blocks(self, start: int, end: int, like: torch.Tensor, overwrite_until: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V of tokens ``start .. end`` as ``[B, H, n, D]`` blocks in position order.

        ``overwrite_until``: this step stores tokens up to there before attention reads the
        blocks; on a ring that may reuse slots the blocks show, so those are copied first."""
        if start < self.start or end > self.end:
            raise RuntimeError(f"offload store holds tokens {self.start}..{self.end}, asked {start}..{end}")
        copy = self.ring is not None and overwrite_until - self.ring > start
        return self._read(self.chunks(start, end), end - start, like, copy)

    def read(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of tokens ``start .. end`` as two ``[B, H, n, D]`` tensors of their own."""
        blocks = self.blocks(start, end, like, 0)
        k, v = (torch.cat([b[i] for b in blocks], dim=-2) for i in (0, 1))
        self.release()
        return k, v

    def map_batch(self, fn, like: torch.Tensor, chunk: int = 512) -> None:
        """Apply a batch map (beam reorder, repeat, select) to every stored token by rewriting it:
        in place, ``chunk`` tokens at a time, when the batch size stays; otherwise the whole store
        is read back (transient) and written again with the new layout."""
        if self.shape is None:
            return
        rows = fn(torch.arange(self.shape[0]))
        if self.end == self.start:
            self._new_layout()
            return
        if torch.equal(rows, torch.arange(self.shape[0])):
            return
        if rows.numel() == self.shape[0]:
            for s in range(self.start, self.end, chunk):
                k, v = self.read(s, min(s + chunk, self.end), like)
                self._write_records(s, fn(k), fn(v))
            return
        start = self.start
        k, v = self.read(start, self.end, like)
        k, v = fn(k), fn(v)
        self._new_layout()
        self.end = start
        self._write_records(start, k, v)
        self.end = start + k.shape[-2]

    def reset(self) -> None:
        """Forget every token (``Cache.reset``): as a new store."""
        self.start = self.end = 0
        self._new_layout()

    def _new_layout(self) -> None:
        """Drop the layout (the next write sets it) and the backing memory."""
        self.shape, self.dtype, self.record = None, None, 0
        self.seg = self.ring if self.ring is not None else self.seg_tokens
        self.close()

    def forget(self, end: int, needed: int) -> None:
        """Drop tokens at positions ``>= end`` (rollback); tokens ``needed .. end`` must remain."""
        if needed < self.start:
            raise KVBoundError(f"offload cannot roll back to token {end}: the sliding-window store no longer "
                               f"holds token {needed}; raise the offload option max_rollback")
        self.end = min(self.end, end)

    # -- backend -------------------------------------------------------------------------
    def release(self) -> None:
        """Attention is done with the last blocks (drop mapped pages from the process)."""

    def close(self) -> None:
        """Let go of the backing memory (files are removed by the cache's finalizer)."""

    def _put(self, seg: int, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``keys``/``values`` ``[B, H, n, D]`` at slots ``idx .. idx + n`` of segment ``seg``."""
        raise NotImplementedError

    def _read(self, chunks, n: int, like: torch.Tensor, copy: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def _runs(kv: torch.Tensor):
    """``((kv, b, h), rows [n, D])`` for each head of a ``[2, B, H, n, D]`` tensor."""
    for k in range(kv.shape[0]):
        for b in range(kv.shape[1]):
            for h in range(kv.shape[2]):
                yield (k, b, h), kv[k, b, h]


class _FileStore(_Store):
    """Segments one after the other in one file, reserved (fallocate) a segment at a time.

    Reads (option ``read``): ``mmap`` maps each segment once and hands attention views of the
    mapping (no copy); the pages attention touched are dropped from the process (``madvise``)
    after each layer, so they count in RSS only while that layer attends. ``pread`` reads each
    head's run into the cache's read-back buffer instead (one copy, one block per layer).
    """

    def __init__(self, cache: "OffloadCache", layer_idx: int, ring: int | None, read: str) -> None:
        super().__init__(ring, SEGMENT)  # SEGMENT read at construction (tests shrink it)
        self.cache = cache
        self.path = os.path.join(cache.folder, f"layer{layer_idx:03d}.kv")
        self.fd: int | None = None
        self.allocated = 0  # bytes reserved in the file
        self.read_mode = read
        self.maps: dict[int, tuple[mmap.mmap, torch.Tensor]] = {}
        self.touched: set[int] = set()

    def _open(self) -> int:
        if self.cache.closed:
            raise KVBoundError("this offload cache was closed; make a new cache")
        if self.fd is None:
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as exc:
                raise _disk_error(exc, self.cache.folder, 0) from None
            self.cache.fds.append(self.fd)
        return self.fd

    def _seg_bytes(self) -> int:
        return self.seg * self.record

    def _reserve(self, size: int) -> None:
        """Preallocate so a full disk fails here, with a clear error, not on a later read."""
        if size <= self.allocated:
            return
        try:
            os.posix_fallocate(self.fd, self.allocated, size - self.allocated)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise _disk_error(exc, self.cache.folder, size - self.allocated) from None
            os.ftruncate(self.fd, size)  # filesystem without fallocate: sparse file
        self.allocated = size

    def allocated_bytes(self) -> int:
        return self.allocated

    def close(self) -> None:
        """Delete this layer's file (``reset``; the cache's finalizer removes the folder)."""
        self.maps.clear()  # a mapping is unmapped once no tensor views it
        self.touched.clear()
        if self.fd is not None and self.fd in self.cache.fds:  # not yet closed by the finalizer
            self.cache.fds.remove(self.fd)
            os.close(self.fd)
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.fd = None
        self.allocated = 0

    def _row_offset(self, seg: int, kv: int, b: int, h: int, idx: int) -> int:
        bsz, heads, d = self.shape
        row = ((kv * bsz + b) * heads + h) * self.seg + idx
        return seg * self._seg_bytes() + row * d * self.dtype.itemsize

    def _put(self, seg: int, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        fd = self._open()
        self._reserve((seg + 1) * self._seg_bytes())
        kv = torch.stack([keys, values]).to("cpu")  # [2, B, H, n, D]; a model on a GPU: through host memory
        try:
            for (k, b, h), rows in _runs(kv):
                raw = memoryview(rows.view(torch.uint8).numpy()).cast("B")
                offset = self._row_offset(seg, k, b, h, idx)
                while raw:
                    done = os.pwrite(fd, raw, offset)
                    raw, offset = raw[done:], offset + done
        except OSError as exc:
            raise _disk_error(exc, self.cache.folder, kv.numel() * kv.element_size()) from None

    def _mapped(self, seg: int) -> torch.Tensor:
        """Segment ``seg`` as a ``[2, B, H, seg, D]`` view of a shared mapping of the file."""
        if seg not in self.maps:
            size = self._seg_bytes()
            mm = mmap.mmap(self._open(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                           offset=seg * size)
            view = torch.frombuffer(mm, dtype=torch.uint8).view(self.dtype).view(2, *self.shape[:2], self.seg, -1)
            self.maps[seg] = (mm, view)
        self.touched.add(seg)
        return self.maps[seg][1]

    def _read(self, chunks, n: int, like: torch.Tensor, copy: bool):
        if self.read_mode == "mmap":
            out = []
            for seg, idx, _, cnt in chunks:
                kv = self._mapped(seg)[..., idx:idx + cnt, :]
                kv = kv.to(like.device, copy=copy)
                out.append((kv[0], kv[1]))
            return out
        fd = self._open()
        buf = self.cache.readback(n * self.record).view(self.dtype).view(2, *self.shape[:2], n, -1)
        for seg, idx, off, cnt in chunks:
            for (k, b, h), rows in _runs(buf[..., off:off + cnt, :]):
                raw = memoryview(rows.view(torch.uint8).numpy()).cast("B")
                if os.preadv(fd, [raw], self._row_offset(seg, k, b, h, idx)) != len(raw):
                    raise KVBoundError(f"offload file {self.path} is shorter than expected (was it modified?)")
        buf = buf.to(like.device, non_blocking=True)
        return [(buf[0], buf[1])]

    def release(self) -> None:
        for seg in self.touched:
            self.maps[seg][0].madvise(mmap.MADV_DONTNEED)
        self.touched.clear()


class _HostStore(_Store):
    """Pinned host memory (models on GPU): one segment grown geometrically, copied to the device per read."""

    def __init__(self, ring: int | None) -> None:
        super().__init__(ring, 1 << 62)
        self.host: torch.Tensor | None = None  # [2, B, H, capacity, D]

    def _put(self, seg: int, idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        need = idx + keys.shape[-2]
        cap = 0 if self.host is None else self.host.shape[-2]
        if need > cap:
            cap = self.ring if self.ring is not None else max(need, 2 * cap, 64)
            grown = torch.empty((2, *self.shape[:2], cap, self.shape[2]), dtype=self.dtype,
                                pin_memory=torch.cuda.is_available())
            if self.host is not None:
                grown[..., :self.host.shape[-2], :].copy_(self.host)
            self.host = grown
        self.host[0, ..., idx:need, :].copy_(keys)
        self.host[1, ..., idx:need, :].copy_(values)

    def allocated_bytes(self) -> int:
        return 0 if self.host is None else nbytes(self.host)

    def _read(self, chunks, n: int, like: torch.Tensor, copy: bool):
        out = []
        for _, idx, _, cnt in chunks:
            kv = self.host[..., idx:idx + cnt, :].to(like.device, non_blocking=True, copy=copy)  # pinned -> device
            out.append((kv[0], kv[1]))
        return out

    def close(self) -> None:
        self.host = None


class OffloadLayer(HotWindowLayer):
    """Hot window in memory; older tokens spilled to and recalled from an offload store."""

    recalls = True

    def __init__(self, cache: "OffloadCache", layer_idx: int, sliding_window: int | None, budget: int,
                 store: _Store) -> None:
        super().__init__(cache, layer_idx, sliding_window, budget)
        self.store = store

    def spill(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        self.store.write(start, *encode_kv(self.cache.codec, keys, values))

    def recall_blocks(self, start: int, end: int, like: torch.Tensor) -> list:
        spill_until = self.seen + like.shape[-2] - self.hot  # this step spills up to here before attention
        blocks = self.store.blocks(start, end, like, spill_until)
        recalled = sum(nbytes(k, v) for k, v in blocks)
        codec = self.cache.codec
        if codec is not None and self.attends_tiered(like):
            # attended in place by the C kernel where every query sees every key; else (and without
            # the kernel) decoded DECODE_CHUNK tokens at a time, when attention reaches them, into one
            # reused buffer
            attend = self.cache.kernel_attention(like)
            blocks = [attention.LazyBlock(min(DECODE_CHUNK, k.shape[-2] - i), self._decoder(k, v, i, like),
                                          attend and partial(attend, k[..., i:i + DECODE_CHUNK, :],
                                                             v[..., i:i + DECODE_CHUNK, :]))
                      for k, v in blocks for i in range(0, k.shape[-2], DECODE_CHUNK)]
            if attend is None or kernels.may_fall_back(like, self.sliding_window):
                recalled += kv_bytes(like, min(DECODE_CHUNK, end - start))  # the decode buffer
        elif codec is not None:  # the records read back and the K/V decoded from them
            blocks = [decode_kv(codec, k, v, like.dtype) for k, v in blocks]
            recalled += sum(nbytes(k, v) for k, v in blocks)
        # alive together: the recalled K/V (mapped pages or the read-back buffer) and what update builds
        self.cache.note_transient(max(recalled, self.cache.readback_bytes()) + self.handover_bytes(recalled, like))
        return blocks

    def _decoder(self, k: torch.Tensor, v: torch.Tensor, i: int, like: torch.Tensor):
        """Loads the K/V of records ``i .. i + DECODE_CHUNK`` of ``k``/``v`` into the cache's decode buffer."""
        def load() -> tuple[torch.Tensor, torch.Tensor]:
            kr, vr = k[..., i:i + DECODE_CHUNK, :], v[..., i:i + DECODE_CHUNK, :]
            buf = self.cache.decode_buffer((2, *kr.shape[:-1], like.shape[-1]), like.dtype)
            codec = self.cache.codec
            return codec.from_bytes(kr, like.dtype, out=buf[0]), codec.from_bytes(vr, like.dtype, out=buf[1])
        return load

    def release_blocks(self) -> None:
        self.store.release()
        if self.layer_idx == self.cache.num_layers - 1:
            self.cache.release_readback()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        out = super().update(key_states, value_states, *args, **kwargs)
        if self.pending_step is None:  # no blocks for attention to read later: drop what the step mapped
            self.store.release()
            if self.layer_idx == self.cache.num_layers - 1:
                self.cache.release_readback()  # the pass is over (else: once attention read the blocks)
        return out

    def map_spilled(self, fn) -> None:
        self.store.map_batch(fn, self.keys)
        self.cache.release_readback()

    def reset_spilled(self) -> None:
        self.store.reset()
        self.cache.release_readback()

    def forget_spilled(self, end: int) -> None:
        needed = 0 if self.sliding_window is None else max(0, end - (self.sliding_window - 1))
        self.store.forget(end, needed)

    def tiers(self) -> dict[str, int]:
        live = self.store.nbytes()
        return {"hot_kv": nbytes(self.keys, self.values), "offloaded": live,
                "offload_slack": self.store.allocated_bytes() - live}

@register("offload", "exact: hot window of `budget` tokens; older K/V offloaded to disk (CPU) or host memory "
          "(GPU) and read back layer by layer", exact=True, options=OffloadOptions, can_rollback=True, beams=True)
class OffloadCache(KVBoundCache):
    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.options = self.parse_options(options)
        if opts.store not in STORES:
            raise KVBoundError(f"offload option store must be one of {', '.join(STORES)}, got {opts.store!r}")
        if opts.read not in READS:
            raise KVBoundError(f"offload option read must be one of {', '.join(READS)}, got {opts.read!r}")
        if isinstance(opts.max_rollback, bool) or not isinstance(opts.max_rollback, int) or opts.max_rollback < 0:
            raise KVBoundError(f"offload option max_rollback must be a whole number >= 0, got {opts.max_rollback!r}")
        if not isinstance(opts.kernel, bool):
            raise KVBoundError(f"offload option kernel must be true or false, got {opts.kernel!r}")
        self.codec = tier_codec(opts, model, "offload")
        self.lossless = self.codec is None or self.codec.lossless
        on_gpu = next(model.parameters()).device.type != "cpu"
        kind = opts.store if opts.store != "auto" else ("host" if on_gpu else "file")
        self.closed = False
        self.fds: list[int] = []
        self.folder: str | None = None
        self._readback: torch.Tensor | None = None
        self._decoded: torch.Tensor | None = None
        if kind == "file":
            parent = os.path.expanduser(opts.dir) if opts.dir is not None else None
            try:
                self.folder = tempfile.mkdtemp(prefix="kvbound-offload-", dir=parent)
            except OSError as exc:
                raise KVBoundError(f"offload dir {parent or tempfile.gettempdir()!r} is not a writable folder "
                                   f"({exc.strerror or exc})") from None
        elif opts.dir is not None:
            raise KVBoundError("offload option dir applies to the file store; drop it or pass store='file'")
        self._finalizer = weakref.finalize(self, _remove_store, self.fds, self.folder)

        layers = []
        for i, w in enumerate(layer_windows(model)):
            ring = None if w is None else (w - 1) + opts.max_rollback
            store = _FileStore(self, i, ring, opts.read) if kind == "file" else _HostStore(ring)
            layers.append(OffloadLayer(self, i, w, budget, store))
        super().__init__(model, budget, layers)
        self.store_kind = kind
        use_tiered_attention(model)

    def kernel_attention(self, like: torch.Tensor):
        """``attend(keys, values, query, scaling, softcap)`` over this store's integer-coded records
        with kvbound's C kernel (:func:`kvbound.kernels.attend_if_pays`: ``None`` when a step has too
        many queries for it), or ``None`` where it does not apply (no integer codec, option
        ``kernel=False``, :func:`kvbound.kernels.applies`)."""
        codec = self.codec
        if codec is None or not codec.is_int or not self.options.kernel or not kernels.applies(like, codec.bits):
            return None

        def attend(keys, values, query, scaling, softcap):
            k, v = (kernels.Coded.records(x, codec.bits, codec.group, query.shape[-1]) for x in (keys, values))
            return kernels.attend_if_pays(query, k, v, codec.bits, scaling, softcap, codec.outliers)
        return attend

    # -- read-back buffer shared by the layers of one forward pass ---------------------------
    def readback(self, size: int) -> torch.Tensor:
        """A uint8 CPU buffer of ``size`` bytes, reused across layers, freed after the pass."""
        if self._readback is None or self._readback.numel() < size:
            self._readback = torch.empty(size, dtype=torch.uint8)
        return self._readback[:size]

    def readback_bytes(self) -> int:
        return 0 if self._readback is None else self._readback.numel()

    def decode_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer for K/V decoded from codec records, reused by every block and layer of a pass."""
        size = math.prod(shape) * dtype.itemsize
        if self._decoded is None or self._decoded.numel() < size:
            self._decoded = torch.empty(size, dtype=torch.uint8)
        return self._decoded[:size].view(dtype).view(shape)

    def release_readback(self) -> None:
        self._readback = self._decoded = None

    def drop_page_cache(self) -> None:
        """File store: write the store's files out and ask the OS to drop their cached pages, so the
        next reads come from disk (benchmarks: a store larger than the RAM left for caching it)."""
        for layer in self.layers:
            fd = getattr(layer.store, "fd", None)
            if fd is not None:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        """Delete the store's files now (also done on garbage collection and at exit)."""
        self.closed = True
        self._finalizer()
        for layer in self.layers:
            layer.store.close()
