"""``offload``: exact bounded-memory cache that moves old K/V out of the hot tier.

The most recent ``budget`` tokens' K/V stay hot (see
:class:`~kvbound.cache.hot_window.HotWindowLayer`); K/V of older tokens are written to an
offload store and read back exactly, layer by layer, whenever attention needs them -- the
classic KV offloading of FlexGen (Sheng et al. 2023) and TriForce's (Sun et al. 2024) exact tier.

Stores (option ``store``):

* ``file`` (default on CPU): one preallocated, append-only file per layer inside a private
  temp folder per cache (``dir`` picks its parent). Writes are one ``pwrite`` per spill; reads
  are one ``preadv`` per recall into a buffer reused by all layers of a forward pass and freed
  at its end, so the process never holds the whole cache again. The folder is deleted by
  :meth:`OffloadCache.close`, on garbage collection and at interpreter exit (Ctrl-C included;
  a ``kill -9`` cannot be caught).
* ``host`` (default on GPU): pinned host memory, copied back to the GPU per layer.

Layout: token ``p``'s K and V are one record ``[2, batch, kv_heads, head_dim]`` at slot ``p``,
so any span of tokens is one contiguous read. Gemma 3 sliding layers never need tokens older
than the window: their store is a ring of ``window - 1 + max_rollback`` slots.

Memory report: ``hot_kv`` (held in memory) and ``offloaded`` (bytes in the store); the
read-back buffer plus the concatenation handed to attention are transient bytes.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import KVBoundError
from .base import KVBoundCache, nbytes
from .model_info import layer_windows
from .registry import register
from .hot_window import HotWindowLayer

STORES = ("auto", "file", "host")


@dataclass
class OffloadOptions:
    dir: str | None = None  # parent folder of the store's temp folder (file store); default: system temp
    store: str = "auto"  # "file", "host" (pinned host memory) or "auto" (file on CPU, host on GPU)
    max_rollback: int = 64  # sliding layers keep this many tokens beyond the window for rollback


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
    """Token-major K/V records of one layer, slot = position (or position % capacity: a ring)."""

    def __init__(self, ring: int | None) -> None:
        self.ring = ring
        self.start = 0  # oldest position still stored (ring) ...
        self.end = 0  # ... and one past the newest
        self.shape: tuple[int, ...] | None = None  # [2, batch, kv_heads, head_dim]
        self.dtype: torch.dtype | None = None
        self.record = 0  # bytes per token

    def nbytes(self) -> int:
        return (self.end - self.start) * self.record

    def _slots(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """(slot, first token offset in the span, count) chunks: 1 (append-only) or <= 2 (ring)."""
        if self.ring is None:
            return [(start, 0, end - start)]
        out, pos = [], start
        while pos < end:
            slot = pos % self.ring
            n = min(end - pos, self.ring - slot)
            out.append((slot, pos - start, n))
            pos += n
        return out

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store tokens ``start .. start+n`` (must continue the store: ``start == end``)."""
        if start != self.end:
            raise RuntimeError(f"offload store: spill at {start} does not continue the store at {self.end}")
        if self.shape is None:
            b, h, _, d = keys.shape
            self.shape, self.dtype = (2, b, h, d), keys.dtype
            self.record = 2 * b * h * d * keys.element_size()
        end = start + keys.shape[-2]
        first = start if self.ring is None else max(start, end - self.ring)
        if first < end:
            cut = first - start
            # [2, B, H, n, D] -> [n, 2, B, H, D]: one contiguous record per token
            data = torch.stack([keys[..., cut:, :], values[..., cut:, :]]).permute(3, 0, 1, 2, 4).contiguous()
            for slot, off, n in self._slots(first, end):
                self._put(slot, data[off:off + n])
        self.end = end
        if self.ring is not None:
            self.start = max(self.start, end - self.ring)

    def read(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of tokens ``start .. end`` as ``[B, H, n, D]`` views of a transient buffer."""
        if start < self.start or end > self.end:
            raise RuntimeError(f"offload store holds tokens {self.start}..{self.end}, asked {start}..{end}")
        n = end - start
        data = self._buffer(n, like)
        for slot, off, cnt in self._slots(start, end):
            self._get(slot, data[off:off + cnt])
        data = data.to(like.device, non_blocking=True)
        return data[:, 0].permute(1, 2, 0, 3), data[:, 1].permute(1, 2, 0, 3)

    def forget(self, end: int, needed: int) -> None:
        """Drop tokens at positions ``>= end`` (rollback); tokens ``needed .. end`` must remain."""
        if needed < self.start:
            raise KVBoundError(f"offload cannot roll back to token {end}: the sliding-window store no longer "
                               f"holds token {needed}; raise the offload option max_rollback")
        self.end = min(self.end, end)

    # -- backend -------------------------------------------------------------------------
    def close(self) -> None:
        """Let go of the backing memory (files are removed by the cache's finalizer)."""

    def _buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _put(self, slot: int, data: torch.Tensor) -> None:
        raise NotImplementedError

    def _get(self, slot: int, out: torch.Tensor) -> None:
        raise NotImplementedError


class _FileStore(_Store):
    """Records in one file; reads go into the cache's shared read-back buffer."""

    def __init__(self, cache: "OffloadCache", layer_idx: int, ring: int | None) -> None:
        super().__init__(ring)
        self.cache = cache
        self.path = os.path.join(cache.folder, f"layer{layer_idx:03d}.kv")
        self.fd: int | None = None
        self.allocated = 0

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

    def _reserve(self, size: int) -> None:
        """Preallocate so a full disk fails here, with a clear error, not on a later read."""
        if size <= self.allocated:
            return
        target = size if self.ring is not None else max(size, 2 * self.allocated, 64 * self.record)
        try:
            os.posix_fallocate(self.fd, 0, target)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise _disk_error(exc, self.cache.folder, target - self.allocated) from None
            os.ftruncate(self.fd, target)  # filesystem without fallocate: sparse file
        self.allocated = target

    def _put(self, slot: int, data: torch.Tensor) -> None:
        fd = self._open()
        raw = memoryview(data.view(torch.uint8).numpy()).cast("B")
        offset = slot * self.record
        self._reserve(offset + len(raw) if self.ring is None else self.ring * self.record)
        try:
            while raw:
                done = os.pwrite(fd, raw, offset)
                raw, offset = raw[done:], offset + done
        except OSError as exc:
            raise _disk_error(exc, self.cache.folder, len(raw)) from None

    def _buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return self.cache.readback(n * self.record).view(self.dtype).view(n, *self.shape)

    def _get(self, slot: int, out: torch.Tensor) -> None:
        fd = self._open()
        raw = memoryview(out.view(torch.uint8).numpy()).cast("B")
        got = os.preadv(fd, [raw], slot * self.record)
        if got != len(raw):
            raise KVBoundError(f"offload file {self.path} is shorter than expected (was it modified?)")


class _HostStore(_Store):
    """Records in pinned host memory (models on GPU), grown geometrically."""

    def __init__(self, ring: int | None) -> None:
        super().__init__(ring)
        self.host: torch.Tensor | None = None

    def _put(self, slot: int, data: torch.Tensor) -> None:
        need = slot + data.shape[0]
        if self.host is None or need > self.host.shape[0]:
            cap = self.ring if self.ring is not None else max(need, 2 * (0 if self.host is None else self.host.shape[0]), 64)
            grown = torch.empty((cap, *self.shape), dtype=self.dtype, pin_memory=torch.cuda.is_available())
            if self.host is not None:
                grown[: self.end].copy_(self.host[: self.end])
            self.host = grown
        self.host[slot:need].copy_(data)

    def _buffer(self, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.empty((n, *self.shape), dtype=self.dtype, device=like.device)  # on the model's device

    def _get(self, slot: int, out: torch.Tensor) -> None:
        out.copy_(self.host[slot:slot + out.shape[0]], non_blocking=True)  # pinned -> device, async

    def close(self) -> None:
        self.host = None


class OffloadLayer(HotWindowLayer):
    """Hot window in memory; older tokens spilled to and recalled from an offload store."""

    recalls = True

    def __init__(self, cache: "OffloadCache", layer_idx: int, sliding_window: int | None, budget: int,
                 store: _Store) -> None:
        super().__init__(cache, layer_idx, sliding_window, budget)
        self.store = store
        self._recalled = 0

    def spill(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        self.store.write(start, keys, values)

    def recall(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.store.read(start, end, like)
        self._recalled = nbytes(k, v)
        return k, v

    def forget_spilled(self, end: int) -> None:
        needed = 0 if self.sliding_window is None else max(0, end - (self.sliding_window - 1))
        self.store.forget(end, needed)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._recalled = 0
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        if self._recalled:  # read-back buffer and the concatenation built from it, alive together
            self.cache.note_transient(max(self._recalled, self.cache.readback_bytes()) + nbytes(keys, values))
        if self.layer_idx == self.cache.num_layers - 1:
            self.cache.release_readback()
        return keys, values

    def tiers(self) -> dict[str, int]:
        return {"hot_kv": nbytes(self.keys, self.values), "offloaded": self.store.nbytes()}


@register("offload", "exact: hot window of `budget` tokens; older K/V offloaded to disk (CPU) or host memory "
          "(GPU) and read back layer by layer", exact=True, options=OffloadOptions, can_rollback=True)
class OffloadCache(KVBoundCache):
    def __init__(self, model, budget: int, **options: Any) -> None:
        opts = self.options = self.parse_options(options)
        if opts.store not in STORES:
            raise KVBoundError(f"offload option store must be one of {', '.join(STORES)}, got {opts.store!r}")
        if isinstance(opts.max_rollback, bool) or not isinstance(opts.max_rollback, int) or opts.max_rollback < 0:
            raise KVBoundError(f"offload option max_rollback must be a whole number >= 0, got {opts.max_rollback!r}")
        on_gpu = next(model.parameters()).device.type != "cpu"
        kind = opts.store if opts.store != "auto" else ("host" if on_gpu else "file")
        self.closed = False
        self.fds: list[int] = []
        self.folder: str | None = None
        self._readback: torch.Tensor | None = None
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
            store = _FileStore(self, i, ring) if kind == "file" else _HostStore(ring)
            layers.append(OffloadLayer(self, i, w, budget, store))
        super().__init__(model, budget, layers)
        self.store_kind = kind

    # -- read-back buffer shared by the layers of one forward pass ---------------------------
    def readback(self, size: int) -> torch.Tensor:
        """A uint8 CPU buffer of ``size`` bytes, reused across layers, freed after the pass."""
        if self._readback is None or self._readback.numel() < size:
            self._readback = torch.empty(size, dtype=torch.uint8)
        return self._readback[:size]

    def readback_bytes(self) -> int:
        return 0 if self._readback is None else self._readback.numel()

    def release_readback(self) -> None:
        self._readback = None

    def close(self) -> None:
        """Delete the store's files now (also done on garbage collection and at exit)."""
        self.closed = True
        self._finalizer()
        for layer in self.layers:
            layer.store.close()
