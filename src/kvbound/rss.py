"""Process memory as the OS reports it (Linux ``/proc``; ``resource`` elsewhere).

``peak_rss_bytes`` is the process high-water mark (``VmHWM``). ``reset_peak_rss`` lowers it to
the current RSS (Linux ``/proc/self/clear_refs``, value 5) so one process can measure several
runs one after another; where that is not possible it returns ``False`` and the caller should run
each measurement in a fresh process.

``returned_transients`` (what :func:`kvbound.generation.generate` runs the prompt's chunks in) stops glibc's
malloc from keeping a prefill's freed tensors in its heap. By default glibc serves allocations of
128 KiB and more with ``mmap`` (returned to the OS on ``free``), but each time such a block is freed
it raises that threshold to the block's size, up to 32 MiB. A chunked prefill frees megabyte-sized
transients (one chunk's MLP and attention tensors) in every layer, so after the first chunk they
are carved from the heap instead, where freed space stays resident and fragments: on SmolLM2 at
7.5k tokens that was most of the RSS an ``offload`` run added above the loaded model (238 MiB;
91 MiB with this context, ``benchmarks/results/long/allocator.md``). Inside the context, allocations
of 1 MiB and more get their own mapping; at the first decoded token (:func:`decoding_threshold`) or on
leaving the outermost context the threshold goes to glibc's dynamic maximum (32 MiB),
so decoding reuses its per-step blocks as it would by default (``full`` reallocates its whole K/V
every step: mapping it afresh each time would slow it down). ``KVBOUND_MMAP_THRESHOLD`` (bytes)
changes the prefill threshold; ``0`` leaves glibc alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from .errors import KVBoundError

PREFILL_MMAP_THRESHOLD = 1 << 20  # bytes: during prefill larger allocations get their own mapping
DECODE_MMAP_THRESHOLD = 32 << 20  # glibc's dynamic maximum on 64-bit: where it ends up by default
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size now."""
    got = _status_bytes("VmRSS")
    if got is not None:
        return got
    return peak_rss_bytes()  # best effort without /proc


def peak_rss_bytes() -> int:
    """Highest resident set size of this process since start (or since :func:`reset_peak_rss`)."""
    got = _status_bytes("VmHWM")
    if got is not None:
        return got
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS; ``False`` if the OS does not allow it."""
    try:
        fd = os.open("/proc/self/clear_refs", os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, b"5")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or ``None`` (another C library or OS); looked up once."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def _threshold_setting() -> int:
    env = os.environ.get("KVBOUND_MMAP_THRESHOLD", "").strip()
    if env and not env.isdigit():
        raise KVBoundError(f"KVBOUND_MMAP_THRESHOLD must be a number of bytes (0 = glibc's default), got {env!r}")
    return int(env) if env else PREFILL_MMAP_THRESHOLD


_open = 0  # returned_transients() contexts open (nested ones restore nothing)


def decoding_threshold() -> None:
    """Give glibc its 32 MiB threshold back (decoding reuses its per-step blocks from the heap);
    :func:`kvbound.generation.generate` calls it after the prompt's last forward pass."""
    mallopt = _mallopt() if _threshold_setting() > 0 else None
    if mallopt:
        mallopt(_M_MMAP_THRESHOLD, DECODE_MMAP_THRESHOLD)


@contextmanager
def returned_transients(nbytes: int | None = None) -> Iterator[bool]:
    """Run the body with allocations of ``nbytes`` or more (default: ``KVBOUND_MMAP_THRESHOLD`` or
    1 MiB) in their own mappings, given back to the OS when freed; when the outermost such context
    ends glibc's threshold is 32 MiB (its dynamic maximum). Yields whether it applied (``False`` for
    ``0`` or without glibc)."""
    global _open
    nbytes = _threshold_setting() if nbytes is None else nbytes
    mallopt = _mallopt() if nbytes > 0 else None
    applied = bool(mallopt and mallopt(_M_MMAP_THRESHOLD, int(nbytes)))
    _open += 1
    try:
        yield applied
    finally:
        _open -= 1
        if applied and not _open:
            mallopt(_M_MMAP_THRESHOLD, DECODE_MMAP_THRESHOLD)
