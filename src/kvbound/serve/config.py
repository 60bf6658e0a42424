"""Server options (:class:`ServeConfig`) and byte sizes such as ``64MiB``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..batching import ROW_GROUP
from ..errors import KVBoundError
from ..generation import DEFAULT_PREFILL_CHUNK  # prompt tokens per forward pass when prefilling or restoring
from ..models import DEFAULT_MODEL

INTERLEAVE_CHUNK = 16  # prompt tokens per pass while other conversations decode (see kvbound.serve.worker)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a whole number of bytes or a number with a unit (``64MiB``, ``1GB``, ``512k``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise KVBoundError(f"memory size {text!r} must be bytes or a number with a unit: B, KB, MB, GB, KiB, MiB, GiB "
                               "(e.g. 64MiB, 1GB)")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0:
        raise KVBoundError(f"memory size must be >= 0 bytes, got {text!r}")
    return value


@dataclass
class ServeConfig:
    """What ``kvbound serve`` runs: the model, each conversation's cache policy and the server's limits."""

    model: str = DEFAULT_MODEL
    policy: str = "full"
    budget: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    memory_budget: int | None = None  # bytes of cache held by all hot conversations; None: no parking
    max_queue: int = 16  # requests waiting for the model; more get 429
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK
    max_conversations: int = 4096  # stored conversations (hot + parked); the least recently used is dropped
    store: str | None = None  # shared parking store URL (redis://host:port/db, unix:///path); None: in-process only
    store_ttl: int | None = 86400  # seconds a shared entry lives after its last write; None: no expiry
    max_batch: int = 8  # conversations decoding together, one forward pass per step (kvbound.batching)
    row_group: int = ROW_GROUP  # pad a batch to batch-invariant row counts (1: no padding)
    # while others decode, prompt tokens per pass (pieces cut at its multiples); None: prefill_chunk
    interleave_chunk: int | None = INTERLEAVE_CHUNK

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_conversations", "max_batch", "row_group", "interleave_chunk"):
            value = getattr(self, name)
            if name == "interleave_chunk" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVBoundError(f"{name} must be a whole number >= 1, got {value!r}")
        if self.memory_budget is not None:
            self.memory_budget = parse_size(self.memory_budget)
