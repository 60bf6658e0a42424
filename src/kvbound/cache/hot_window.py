"""Shared layer for policies built around a hot window of recent tokens.

A :class:`HotWindowLayer` keeps the K/V of the ``hot`` most recent tokens. Tokens leaving
the window are handed to :meth:`HotWindowLayer.spill` (a lossy policy drops them; an exact
policy checkpoints or offloads them). Layers of exact policies set ``recalls = True`` and implement
:meth:`HotWindowLayer.recall`, which returns the K/V of every older token attention still
needs, so each step sees exactly what the full cache would hold.

Attention reads the recalled tokens in place when the model runs kvbound's tiered attention
(:mod:`kvbound.attention`): no concatenation of the old span with the hot window.

On sliding-window layers (Gemma 3) tokens older than ``window - 1`` are never needed again:
the hot window is at most ``window - 1`` tokens and exact policies recall only the part of
the window that is not hot. Past keys are always a contiguous suffix, so masks stay exact.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from .. import attention
from .base import KVBoundCache, PolicyLayer, nbytes


class HotWindowLayer(PolicyLayer, DynamicLayer):
    recalls: bool = False  # True: spilled tokens are recalled for attention (exact policies)

    def __init__(self, cache: KVBoundCache, layer_idx: int, sliding_window: int | None, hot: int) -> None:
        DynamicLayer.__init__(self)
        self._init_policy(cache, layer_idx, sliding_window)
        self.hot = hot if sliding_window is None else max(1, min(hot, sliding_window - 1))
        self.pending_step: attention.TierStep | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    # -- what a subclass provides -------------------------------------------------------
    def spill(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """Tokens ``start .. start+n`` leave the hot window (views: copy what you keep)."""

    def recall(self, start: int, end: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of tokens ``start .. end`` (exact policies only)."""
        raise NotImplementedError

    def recall_blocks(self, start: int, end: int, like: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """K/V of tokens ``start .. end`` as blocks in position order (default: one :meth:`recall`).

        ``like`` is the step's new keys. Blocks may be views into a store: they stay valid until
        :meth:`release_blocks`, which the step calls once attention has read them."""
        return [self.recall(start, end, like)]

    def release_blocks(self) -> None:
        """Attention is done with this step's recalled blocks."""

    def attends_tiered(self, like: torch.Tensor) -> bool:
        """Whether this step's attention reads recalled blocks one by one (kvbound's tiered attention
        for this cache, K/V like ``like``), so they may be :class:`~kvbound.attention.LazyBlock`s."""
        return attention.active_cache() is self.cache and like.dtype in attention.TIERED_DTYPES

    SMALL_RECALL = 256  # recalled tokens up to which one concatenation beats a second attention call + merge

    def _small_recall(self, blocks: list) -> bool:
        """Whether the recalled span is short enough to concatenate in front of the hot + new K/V
        (one attention call instead of one per tier and a merge: short conversations in a server,
        where a step's per-row overhead counts; the copy is at most :attr:`SMALL_RECALL` tokens)."""
        if not all(isinstance(b, tuple) for b in blocks):  # lazily decoded blocks: attended one by one
            return False
        return sum(k.shape[-2] for k, _ in blocks) <= self.SMALL_RECALL

    def handover_bytes(self, recalled: int, like: torch.Tensor) -> int:
        """Bytes ``update`` builds for attention besides ``recalled`` bytes of recalled K/V: the
        hot + new concatenation, and a concatenated copy of everything without tiered attention."""
        hot_new = nbytes(self.keys, self.values) + 2 * nbytes(like)
        return hot_new if attention.active_cache() is self.cache else recalled + 2 * hot_new

    def forget_spilled(self, end: int) -> None:
        """Roll back: spilled tokens at positions ``>= end`` are forgotten (see :meth:`truncate`).

        Nothing to do for lossy layers or when the policy's per-token state is cropped
        elsewhere (kv-direct's token ids follow ``seen``); stores override it.
        """

    def map_spilled(self, fn) -> None:
        """Apply ``fn`` (a batch map: beam reorder, repeat, select) to the spilled tokens' state.

        Nothing to do for lossy layers or when the per-token state lives on the cache
        (kv-direct's token ids, :meth:`KVBoundCache.map_batch_state`); stores override it.
        """

    def reset_spilled(self) -> None:
        """Forget every spilled token (:meth:`reset`); stores override it."""

    # -- reset and batch maps (beam search) -------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.pending_step = None
        self.reset_spilled()

    def map_batch(self, fn) -> None:
        self.map_spilled(fn)
        super().map_batch(fn)

    # -- rollback and draft refresh (kvbound.speculative) ---------------------------------
    def truncate(self, n: int) -> None:
        """Forget the last ``n`` tokens: crop the hot window; if ``n`` reaches past it the
        spilled tail is forgotten too (:meth:`forget_spilled`)."""
        held = self.held()
        if n > held:
            self.forget_spilled(self.seen - n)
        if held:
            keep = max(0, held - n)
            self.keys = self.keys[..., :keep, :].clone()
            self.values = self.values[..., :keep, :].clone()
        self.seen -= n
        self.cache.account(self.layer_idx)

    def adopt_recent(self, keys: torch.Tensor, values: torch.Tensor, seen: int) -> None:
        """Restart this (lossy) layer from exact K/V: the hot window becomes the last
        ``min(hot, n)`` of ``keys``/``values`` (the K/V of tokens ``seen - n .. seen``).

        The tensors are shared, not copied: ``update`` never writes into held tensors.
        """
        if self.recalls:
            raise RuntimeError("adopt_recent is for lossy draft layers")
        n = min(self.hot, keys.shape[-2])
        if not self.is_initialized:
            self.lazy_initialization(keys, values)
        self.keys, self.values = keys[..., keys.shape[-2] - n:, :], values[..., values.shape[-2] - n:, :]
        self.seen = seen
        self.cache.account(self.layer_idx)

    # -- bookkeeping ----------------------------------------------------------------------
    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def needed_start(self) -> int:
        """First token position attention can still use in the next step."""
        if self.sliding_window is None:
            return 0
        return max(0, self.seen - (self.sliding_window - 1))

    def past_visible(self) -> int:
        return self.seen - self.needed_start() if self.recalls else self.held()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append the step's K/V, spill what leaves the hot window, return what attention reads.

        With kvbound's tiered attention active for this call (:mod:`kvbound.attention`) and float32
        K/V, the recalled older tokens are not concatenated: they are handed over as blocks
        (:class:`~kvbound.attention.TierStep`) next to the returned hot + new K/V. Otherwise (another
        attention function, or bf16/fp16, where merging blocks would round twice) the blocks are
        concatenated in front, as a plain attention function needs.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending_step = None  # a hand-over an interrupted pass never used
        held, new = self.held(), key_states.shape[-2]
        first_hot, start = self.seen - held, self.needed_start()
        blocks = self.recall_blocks(start, first_hot, key_states) if self.recalls and first_hot > start else []
        keys, values = torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)
        n_spill = max(0, held + new - self.hot)
        if n_spill:
            self.spill(keys[..., :n_spill, :], values[..., :n_spill, :], first_hot)
        # clone so the evicted part of the concatenation is really freed
        self.keys = keys[..., n_spill:, :].clone()
        self.values = values[..., n_spill:, :].clone()
        self.seen += new
        self.cache.account(self.layer_idx)
        if blocks and self.attends_tiered(keys) and not self._small_recall(blocks):
            self.pending_step = attention.TierStep(keys, blocks, release=self.release_blocks)
        elif blocks:
            keys = torch.cat([*(k for k, _ in blocks), keys], dim=-2)
            values = torch.cat([*(v for _, v in blocks), values], dim=-2)
            self.release_blocks()
        self.cache.note_transient(nbytes(keys, values))
        return keys, values
