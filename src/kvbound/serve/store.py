"""Conversations, their caches, and parking under a global memory budget.

A request continues the stored conversation whose last *prompt* is the longest prefix of the
request's tokens, keeping as much of that conversation's last reply as the request repeats (a
client sends the reply back as text, which need not re-tokenize to the same ids). Continuing
means rolling the cache back to the shared prefix (``cache.truncate``); a policy that cannot roll
back gets a fresh cache instead.

Parking: when the bytes held by all hot conversations' caches exceed ``memory_budget``, the least
recently used idle conversations are parked -- the cache is closed and dropped, and only the
conversation's token ids stay (int32, in the radix tree: 4 bytes per token, shared prefixes once).
The next request restores a parked conversation with a fresh cache of the same policy and a
chunked prefill of its tokens, which rebuilds the K/V the cache would hold.

Shared parking (``shared``, e.g. :class:`.redis_store.RedisParking`): each turn's token ids are also
written through under the conversation's key (:mod:`.affinity`); a request whose conversation this
store does not hold adopts the shared entry as a parked conversation and restores it the same way.
"""

from __future__ import annotations

import ctypes
import itertools
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..cache.base import KVBoundCache
from ..cache.registry import get_policy
from ..errors import KVBoundError
from .radix import Node, RadixTree, as_ids, common_prefix

TOKEN_ID_BYTES = array("i").itemsize  # 4


FILE_TIERS = ("offloaded", "offload_slack")  # the offload policy's file store: on disk, not in memory


def held_bytes(cache: KVBoundCache) -> int:
    """Bytes a cache holds in memory: every tier except K/V offloaded to a file."""
    tiers = cache.bytes_by_tier()
    if getattr(cache, "store_kind", None) == "file":
        tiers = {k: v for k, v in tiers.items() if k not in FILE_TIERS}
    return sum(tiers.values())


def release(cache: KVBoundCache) -> None:
    """Free a cache's memory now: close it (offload files) and drop its layers. Each layer points back
    at its cache, a reference cycle that would otherwise wait for the garbage collector's next full
    pass -- parked caches then pile up in the RSS (measured: 1.1 GB more peak RSS in the benchmark)."""
    cache.close()
    cache.layers.clear()


class SharedParking(Protocol):
    """A parking store shared beyond this process (:class:`.redis_store.RedisParking`)."""

    def save(self, conversation: str, tokens: array) -> bool: ...
    def fetch(self, conversation: str) -> array | None: ...
    def stats(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


@dataclass(eq=False)
class Conversation:
    """One conversation: its tokens (tree node = last prompt, ``tail`` = last reply) and its cache (``None``: parked)."""

    id: int
    cache: KVBoundCache | None
    node: Node | None = None
    tail: array = field(default_factory=lambda: array("i"))
    hot_kv_bytes: int = 0
    held_bytes: int = 0
    key: str | None = None  # its key in the shared parking store

    @property
    def parked(self) -> bool:
        return self.cache is None

    def num_tokens(self) -> int:
        return (self.node.depth() if self.node is not None else 0) + len(self.tail)


@dataclass
class Lease:
    """A conversation checked out for one request: continue its cache from ``reused`` tokens."""

    conversation: Conversation
    reused: int  # prompt tokens the cache already holds
    restored: bool  # the conversation was parked and got a fresh cache
    matched: bool  # a stored conversation was continued (hot or parked)


class ConversationStore:
    """Stored conversations in least-recently-used order; thread-safe (one lock, held briefly)."""

    def __init__(self, new_cache: Callable[[], KVBoundCache], memory_budget: int | None = None,
                 max_conversations: int = 4096, shared: SharedParking | None = None) -> None:
        self.new_cache = new_cache
        self.shared = shared
        self.memory_budget = memory_budget
        self.max_conversations = max_conversations
        self.tree = RadixTree()
        self.conversations: OrderedDict[int, Conversation] = OrderedDict()  # oldest first
        self.lock = threading.Lock()
        self._ids = itertools.count(1)
        self.counters = {"prefix_hits": 0, "reused_tokens": 0, "restores": 0, "parks": 0, "dropped": 0,
                         "shared_restores": 0}

    # -- one request ------------------------------------------------------------------------
    def checkout(self, tokens, key: str | None = None) -> Lease:
        """The conversation a request with prompt ``tokens`` continues (or a new one), ready to prefill.
        ``key``: the conversation's key in the shared store, read when no stored conversation matches."""
        tokens = as_ids(tokens)
        with self.lock:
            conv, _ = self._match(tokens)
        if conv is None and key is not None and self.shared is not None:
            self._adopt(tokens, key, self.shared.fetch(key))  # Redis is called outside the lock
        with self.lock:
            conv, shared = self._match(tokens)
            if conv is None:
                conv = Conversation(next(self._ids), self.new_cache(), key=key)
                self.conversations[conv.id] = conv
                return Lease(conv, 0, restored=False, matched=False)
            conv.key = key if key is not None else conv.key
            self.tree.remove(conv.node, conv.id)
            conv.node, conv.tail = None, array("i")
            keep = min(shared, len(tokens) - 1)  # the last prompt token is fed to get the first reply token
            restored = conv.cache is None
            if restored:
                conv.cache = self.new_cache()
                self.counters["restores"] += 1
            elif conv.cache.get_seq_length() > keep and not self._roll_back(conv.cache, keep):
                release(conv.cache)  # start over from the tokens
                conv.cache = self.new_cache()
            reused = conv.cache.get_seq_length()
            self.counters["prefix_hits"] += 1
            self.counters["reused_tokens"] += reused
            return Lease(conv, reused, restored=restored, matched=True)

    def _adopt(self, tokens: array, key: str, stored: array | None) -> None:
        """Take a shared entry in as a parked conversation: the ids it shares with the request (an
        entry that is not a prefix of the request's conversation is somebody else's and is ignored)."""
        if stored is None:
            return
        keep = min(common_prefix(stored, tokens), len(tokens) - 1)
        if keep < 1:
            return
        with self.lock:
            conv = Conversation(next(self._ids), None, key=key)
            conv.node = self.tree.insert(tokens[:keep], conv.id)
            self.conversations[conv.id] = conv
            self.conversations.move_to_end(conv.id, last=False)  # the first to drop if over the limit
            self.counters["shared_restores"] += 1

    @staticmethod
    def _roll_back(cache: KVBoundCache, keep: int) -> bool:
        """Roll ``cache`` back to its first ``keep`` tokens; ``False`` if its policy cannot."""
        if not get_policy(cache.policy_name).can_rollback:
            return False
        try:
            cache.truncate(cache.get_seq_length() - keep)
        except KVBoundError:  # e.g. residual on sliding-window layers whose residuals are gone
            return False
        return True

    def _match(self, tokens: array) -> tuple[Conversation | None, int]:
        """Longest continuation: stored prompts that are proper prefixes of ``tokens``, ranked by the
        tokens shared with the whole conversation, then hot before parked, then most recent."""
        best, best_rank, shared = None, None, 0
        order = {cid: i for i, cid in enumerate(self.conversations)}
        for node, depth in self.tree.prefixes(tokens):
            if depth >= len(tokens):  # the same prompt again is a new branch, not a continuation
                continue
            for cid in node.keys:
                conv = self.conversations[cid]
                common = depth + common_prefix(conv.tail, tokens[depth:depth + len(conv.tail)])
                rank = (common, not conv.parked, order[cid])
                if best_rank is None or rank > best_rank:
                    best, best_rank, shared = conv, rank, common
        return best, shared

    def checkin(self, conv: Conversation, prompt, reply) -> None:
        """Store ``conv`` after a request: ``prompt`` + ``reply`` are its tokens (the cache has seen all
        but the last). Then park least recently used conversations while over the memory budget."""
        with self.lock:
            conv.node = self.tree.insert(as_ids(prompt), conv.id)
            conv.tail = as_ids(reply)
            report = conv.cache.memory_report()
            conv.hot_kv_bytes, conv.held_bytes = report["hot_kv_bytes"], held_bytes(conv.cache)
            self.conversations.move_to_end(conv.id)
            self._enforce_limits()
        if self.shared is not None and conv.key is not None:  # write-through, outside the lock
            self.shared.save(conv.key, as_ids(prompt) + as_ids(reply))

    def discard(self, conv: Conversation) -> None:
        """Forget a conversation whose request failed (its cache may be half-updated)."""
        with self.lock:
            self._drop(conv)

    # -- limits -------------------------------------------------------------------------------
    def _enforce_limits(self) -> None:
        freed = False
        if self.memory_budget is not None:
            # checked-out conversations (no node: decoding in the batch) count with what they hold now
            total = sum(held_bytes(c.cache) if c.node is None else c.held_bytes
                        for c in self.conversations.values() if not c.parked)
            for conv in list(self.conversations.values()):  # least recently used first
                if total <= self.memory_budget:
                    break
                if not conv.parked and conv.node is not None:  # idle (a checked-out one has no node)
                    total -= conv.held_bytes
                    self._park(conv)
                    freed = True
        while len(self.conversations) > self.max_conversations:
            oldest = next(c for c in self.conversations.values() if c.node is not None)
            self._drop(oldest)
            self.counters["dropped"] += 1
            freed = True
        if freed:
            _return_memory_to_os()

    def _park(self, conv: Conversation) -> None:
        release(conv.cache)
        conv.cache = None
        conv.hot_kv_bytes = conv.held_bytes = 0
        self.counters["parks"] += 1

    def _drop(self, conv: Conversation) -> None:
        if conv.node is not None:
            self.tree.remove(conv.node, conv.id)
            conv.node = None
        if conv.cache is not None:
            release(conv.cache)
            conv.cache = None
        self.conversations.pop(conv.id, None)

    def close(self) -> None:
        """Close every cache (offload files) and forget all conversations."""
        with self.lock:
            for conv in list(self.conversations.values()):
                self._drop(conv)
        if self.shared is not None:
            self.shared.close()

    # -- reporting ------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | None]:
        with self.lock:
            convs = list(self.conversations.values())
            hot = [c for c in convs if not c.parked]
            parked = [c for c in convs if c.parked]
            return {
                "conversations": len(convs),
                "hot": len(hot),
                "parked": len(parked),
                "hot_kv_bytes": sum(c.hot_kv_bytes for c in hot),
                "held_bytes": sum(c.held_bytes for c in hot),
                "memory_budget": self.memory_budget,
                "parked_tokens": sum(c.num_tokens() for c in parked),
                "parked_bytes": TOKEN_ID_BYTES * sum(c.num_tokens() for c in parked),
                "token_id_bytes": self.tree.token_bytes() + sum(len(c.tail) * TOKEN_ID_BYTES for c in convs),
                **self.counters,
                **(self.shared.stats() if self.shared is not None else {"store": "memory"}),
            }


def _return_memory_to_os() -> None:
    """Ask glibc to hand freed heap pages back (freed caches otherwise stay in the RSS); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
