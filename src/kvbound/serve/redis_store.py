"""The shared parking store: every conversation's token ids in a real Redis server, written through.

At the end of every turn a server writes the conversation's token ids (prompt + reply, int32, 4 bytes
per token) to Redis under ``kvbound:<model>:<conversation key>`` (:mod:`.affinity`), with a TTL.
A server that gets a request for a conversation it does not hold reads the entry, checks it (magic,
model, length, CRC-32, ids in the vocabulary, a prefix of the request) and restores the conversation
by a chunked re-prefill (:meth:`.store.ConversationStore.checkout`). An entry that fails a check is
refused and counted; the conversation is then rebuilt from the request's own tokens, so a bad entry
never changes a reply.

Redis being down never stops serving: every Redis call has a short timeout, a failure marks the store
*down* (reported by ``/health`` and ``/stats``) and the next try waits :attr:`RedisParking.retry_s`.
Needs the ``cluster`` extra: ``pip install 'kvbound[cluster]'``.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from array import array
from typing import Any

from ..errors import KVBoundError

MAGIC = b"KVB1"
KEY_PREFIX = "kvbound:"
_HEADER_LEN = struct.Struct("<I")


def encode_entry(model: str, tokens: array) -> bytes:
    """One store entry: magic, header length, JSON header (model, token count, CRC-32), int32 ids."""
    payload = tokens.tobytes()
    header = json.dumps({"model": model, "n": len(tokens), "crc": zlib.crc32(payload)}).encode()
    return MAGIC + _HEADER_LEN.pack(len(header)) + header + payload


def decode_entry(raw: bytes, model: str, vocab_size: int | None = None) -> array:
    """The token ids of an entry written for ``model``; raises :class:`KVBoundError` (one line) otherwise."""
    if len(raw) < len(MAGIC) + _HEADER_LEN.size or not raw.startswith(MAGIC):
        raise KVBoundError("not a kvbound entry (bad magic)")
    start = len(MAGIC) + _HEADER_LEN.size
    (hlen,) = _HEADER_LEN.unpack_from(raw, len(MAGIC))
    try:
        header = json.loads(raw[start:start + hlen])
        stored_model, n, crc = header["model"], int(header["n"]), int(header["crc"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KVBoundError(f"corrupt entry header ({type(exc).__name__})") from None
    if stored_model != model:
        raise KVBoundError(f"the entry is for model {stored_model!r}, not {model!r}")
    payload = raw[start + hlen:]
    if len(payload) != 4 * n or zlib.crc32(payload) != crc:
        raise KVBoundError("corrupt entry (length or CRC-32 mismatch)")
    tokens = array("i")
    tokens.frombytes(payload)
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in tokens):
        raise KVBoundError(f"corrupt entry (token ids outside 0..{vocab_size - 1})")
    return tokens


class RedisParking:
    """Write-through token-id parking in Redis, shared by every replica (and by restarts of one server).

    ``url``: ``redis://host:port/db`` or ``unix:///path/redis.sock``; ``ttl_s``: seconds an entry lives
    after its last write (``None``: no expiry). :meth:`connect` fails fast when Redis is unreachable."""

    kind = "redis"

    def __init__(self, url: str, model: str, vocab_size: int | None = None, ttl_s: int | None = 86400,
                 timeout_s: float = 0.5, retry_s: float = 2.0) -> None:
        try:
            import redis
        except ImportError as exc:
            raise KVBoundError(f"--store redis://... needs the cluster extra ({exc.name} is missing): "
                               "pip install 'kvbound[cluster]'") from None
        if ttl_s is not None and (isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1):
            raise KVBoundError(f"the store TTL must be a whole number of seconds >= 1, got {ttl_s!r}")
        self._errors = (redis.RedisError, OSError)
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as exc:
            raise KVBoundError(f"bad store URL {url!r}: {exc}") from None
        self.url, self.model, self.vocab_size, self.ttl_s, self.retry_s = url, model, vocab_size, ttl_s, retry_s
        self.up = True
        self.last_error: str | None = None
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self.counters = {"writes": 0, "reads": 0, "hits": 0, "refused": 0, "errors": 0, "skipped": 0}

    @classmethod
    def connect(cls, url: str, model: str, **kw: Any) -> "RedisParking":
        """A store whose Redis answered a PING now; else :class:`KVBoundError` with one line."""
        store = cls(url, model, **kw)
        try:
            store.client.ping()
        except store._errors as exc:
            store.client.close()
            raise KVBoundError(f"cannot reach the Redis store at {url}: {_first_line(exc)}") from None
        return store

    def key(self, conversation: str) -> str:
        return f"{KEY_PREFIX}{self.model}:{conversation}"

    # -- calls that may fail: down -> skipped until retry_s has passed ---------------------------------
    def _call(self, fn, *args):
        with self._lock:
            if not self.up and time.monotonic() < self._retry_at:
                self.counters["skipped"] += 1
                return None, False
        try:
            out = fn(*args)
        except self._errors as exc:
            with self._lock:
                self.up, self.last_error = False, _first_line(exc)
                self._retry_at = time.monotonic() + self.retry_s
                self.counters["errors"] += 1
            return None, False
        with self._lock:
            self.up, self.last_error = True, None
        return out, True

    def save(self, conversation: str, tokens: array) -> bool:
        """Write a conversation's token ids (after a turn); ``False`` if Redis is down."""
        _, ok = self._call(self.client.set, self.key(conversation), encode_entry(self.model, tokens), self.ttl_s)
        if ok:
            self.counters["writes"] += 1
        return ok

    def fetch(self, conversation: str) -> array | None:
        """The stored token ids of a conversation, or ``None`` (absent, refused, or Redis down)."""
        raw, ok = self._call(self.client.get, self.key(conversation))
        if not ok:
            return None
        self.counters["reads"] += 1
        if raw is None:
            return None
        try:
            tokens = decode_entry(raw, self.model, self.vocab_size)
        except KVBoundError as exc:
            self.counters["refused"] += 1
            self.last_refused = str(exc)
            return None
        self.counters["hits"] += 1
        return tokens

    def ping(self) -> bool:
        """Check Redis now (ignores the retry wait); updates :attr:`up`."""
        with self._lock:
            self._retry_at = 0.0
        _, ok = self._call(self.client.ping)
        return ok

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"store": self.kind, "store_up": self.up, "store_error": self.last_error,
                    "store_ttl_s": self.ttl_s, **{f"store_{k}": v for k, v in self.counters.items()}}

    def close(self) -> None:
        try:
            self.client.close()
        except self._errors:
            pass


def connect_store(url: str, model: str, **kw: Any) -> RedisParking:
    """The shared store of a ``--store`` URL, reachable now; else :class:`KVBoundError` with one line."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise KVBoundError(f"--store must be a redis://, rediss:// or unix:// URL, got {url!r}")
    return RedisParking.connect(url, model, **kw)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
