"""Shared machinery of the lossy eviction policies (``streaming``, ``h2o``, ``tova``, ``snapkv``).

Budget semantics
----------------
``budget`` is the mean number of tokens held between forward passes per (full-attention layer,
KV head). How it is spread over layers and heads is the ``allocation`` option
(:mod:`kvbound.cache.allocation`: ``uniform``, PyramidKV's ``pyramid``, Ada-KV's ``ada``, CAKE's
``cake``); every allocation holds the same total. Inside a step a layer returns its kept past
plus the step's new tokens to attention, then evicts down to its capacity at the end of
``update`` and stores *fresh* tensors (``gather`` / ``clone`` / boolean packing), so evicted K/V
are really freed and the accounting (which counts elements) measures what is held. The
concatenation returned to attention and the step's query are reported as transient bytes; the
scoring buffer (float32 logits of a block of queries, at most
:data:`kvbound.attention.MASS_BLOCK_BYTES`) is not.

Ragged heads
------------
When every head of a layer keeps the same number of tokens the layer holds rectangular
``[batch, kv_heads, n, head_dim]`` tensors (the fast path). When they differ (``ada``, ``razor``)
every per-token tensor -- K/V (or their codec bytes), positions, the policy's ``token_state`` --
is held *packed*: the kept tokens of head (0, 0), then (0, 1), ... as ``[kept, ...]`` with
``lengths`` ``[batch, kv_heads]``; nothing is padded between steps, so the bytes held are the kept
tokens times the head's bytes. A step unpacks them into the step's padded concatenation (like the
concatenation every step already builds) and hands kvbound's attention an additive bias that is
``-inf`` on the padding (:class:`kvbound.attention.TierStep` ``key_bias``): one fused attention call
for all heads, exactly the softmax over each head's own tokens. Ragged heads and per-layer budgets
need kvbound's attention (a model on ``sdpa``); other attention implementations are refused.

Writing a scorer (the contract)
-------------------------------
A new scored policy subclasses :class:`EvictingLayer` and :class:`EvictingCache` and gets every
allocation for free. It implements:

* ``query_rows(new) -> int`` -- how many of the step's newest query rows it needs (0: none);
* ``select(keys, positions, query, query_pos, mass=None)`` -- compute per-token scores
  ``[B, kv_heads or 1, n]`` float (higher = keep, ``+inf`` = must keep, any value on padding) over
  ``keys`` (past + new; padded for ragged heads, padding at :data:`BIG_POSITION`) and
  ``return self.keep(scores, protect_last=k)``: :meth:`EvictingLayer.keep` is the one function that
  asks the cache's allocation how many tokens each head keeps and returns the selection. Never
  call ``keep_top(scores, self.capacity)`` directly (that is ``uniform`` only);
* per-token state aligned with the held keys (accumulated scores, votes): list it in
  ``token_state`` (``{"scores": 2}``: attribute name -> the dim of its tokens) and assign it
  *ungathered* (aligned with ``keys``) in ``select``; the base class gathers or packs it with the
  K/V. Other state goes in ``policy_tiers`` / ``reset_policy`` as before;
* the options dataclass derives from :class:`kvbound.cache.allocation.AllocationOptions`, and the
  cache may override ``protected_tokens()`` (the newest tokens it always keeps, for PyramidKV's cap).

Every kept token keeps its original RoPE rotation; ``positions`` records, per head, which
token each kept entry is (ascending). Masks stay consistent because ``get_mask_sizes`` reports
the number of keys returned (see :class:`~kvbound.cache.base.PolicyLayer`).

Attention scores
----------------
Scored policies never switch the model to eager attention. A model on ``sdpa`` is switched to
kvbound's tiered attention (:mod:`kvbound.attention`), which computes the probabilities of the
query rows a policy needs inside the model's own attention call (same query, same softmax) and
hands them to the layer, which then evicts: no second query projection, no second pass. For a
model on another attention implementation the attention pre-hook
(:func:`kvbound.cache.hooks.attach`) hands each layer's normed input to
:meth:`EvictingCache.observe_attention_input`, which computes the post-RoPE query of the rows
the policy needs with :meth:`kvbound.recompute.LayerDriver.query` and parks it on the layer;
``update`` then computes softmax(q·Kᵀ·scaling) over the keys it returns (causal by position,
blocks of queries to bound memory) with :func:`attention_mass`.

Sliding-window layers (Gemma 3)
-------------------------------
On sliding layers every policy keeps the most recent ``min(budget, window - 1)`` tokens, a
contiguous suffix: tokens outside the window are never needed again, the sliding mask is exact
only when past keys are a contiguous suffix, and all sliding layers must return the same
number of keys (one mask serves them all). The policy proper runs on full-attention layers.

Compressing a prefilled context (kvpress's protocol)
----------------------------------------------------
:meth:`EvictingCache.compress` takes the K/V of a context prefilled elsewhere (once, shared by
every policy and ratio: :class:`kvbound.cache.context.ContextRecorder`) and lets each layer apply
its own ``select`` to it, as for one prefill step of the whole context, keeping ``keep`` tokens;
afterwards the cache holds everything that follows (the question and the answer are appended
uncompressed). It is what ``kvbound bench --scenario ruler --protocol compress`` runs.

Batches
-------
Batches without padding work (each sequence selects its own tokens), and beam search reorders
every per-sequence tensor (K/V, positions, scores, stored votes) together. Padded batches are
refused: after eviction the padding mask would be applied to the wrong keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from .. import attention
from ..errors import KVBoundError
from ..recompute import LayerDriver
from .base import KVBoundCache, PolicyLayer, gather_tokens, nbytes
from .channels import think_layer, think_ratio
from .checks import refuse_padding
from .codec import CodecOptions, decode_kv, encode_kv, tier_codec
from .hooks import use_tiered_attention
from ..errors import KVBoundError
from .allocation import AllocationOptions, Kept, cake_capacities, cake_preference, check_allocation, choose, pyramid_capacities
from .model_info import layer_windows

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from .context import ContextRecorder

@dataclass
class EvictingOptions(CodecOptions):
    """Options every token-eviction policy takes: a codec for the kept tokens (:class:`CodecOptions`)
    and ``think``, ThinK's key-channel pruning of the kept keys (:mod:`kvbound.cache.channels`)."""

    think: float | None = None  # fraction of key channels pruned per KV head from the kept keys (ThinK); None = off


@dataclass
class ScoredOptions(EvictingOptions, AllocationOptions):
    """Options every scored policy takes: a codec and ``think`` (:class:`EvictingOptions`) and how its
    budget is spread over layers and heads (:class:`~kvbound.cache.allocation.AllocationOptions`)."""


# --------------------------------------------------------------------------- scoring helpers


def attention_mass(
    query: torch.Tensor,
    query_pos: torch.Tensor,
    keys: torch.Tensor,
    key_pos: torch.Tensor,
    scaling: float,
    softcap: float | None = None,
    per_query: bool = False,
) -> torch.Tensor:
    """Attention probability each key receives, summed over the given queries and over the
    query heads sharing each KV head.

    ``query`` is ``[B, heads, T, D]`` (post-RoPE) at positions ``query_pos`` ``[T]``; ``keys``
    ``[B, kv_heads, n, D]`` at per-head positions ``key_pos`` ``[B, kv_heads, n]``. A query sees
    keys at positions <= its own (causal); one that sees none gives no attention (zeros, not NaN).
    Query head ``h`` reads KV head ``h // groups`` (transformers' ``repeat_kv``). Returns
    ``[B, kv_heads, n]`` float32, or with ``per_query`` one row per query, ``[B, kv_heads, T, n]``.
    """

    def visible(start: int, stop: int) -> torch.Tensor:  # [B, kv_heads, stop - start, n], one block at a time
        return key_pos[:, :, None, :] <= query_pos[start:stop][None, None, :, None]

    return attention.mass_from_lse(query, keys, visible, None, scaling, softcap, per_query)


def keep_top(scores: torch.Tensor, k: int, protect_last: int = 0) -> torch.Tensor:
    """Indices (ascending) of the ``k`` highest ``scores`` along the last dim; the last
    ``protect_last`` entries are always kept. ``scores`` is ``[..., n]``, ``n >= k >= protect_last``."""
    scores = scores.nan_to_num(nan=float("-inf"))  # topk ranks NaN above +inf
    if protect_last:
        scores[..., scores.shape[-1] - protect_last:] = float("inf")
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def pool_votes(votes: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's smoothing: 1-D max pooling (stride 1, same length) along the last dim."""
    if kernel <= 1 or votes.shape[-1] == 0:
        return votes
    shape = votes.shape
    pooled = F.max_pool1d(votes.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(shape)


# --------------------------------------------------------------------------- ragged heads


BIG_POSITION = 2 ** 62  # position of a ragged head's padding entries: no query ever sees them


def mask_index(mask: torch.Tensor) -> torch.Tensor:
    """The flat positions of ``mask``'s True entries, row-major (what :func:`pack` and :func:`unpack`
    take, computed once for all the per-token tensors of a layer)."""
    return mask.reshape(-1).nonzero().squeeze(1)


def pack(x: torch.Tensor, mask: torch.Tensor, dim: int = 2, index: torch.Tensor | None = None) -> torch.Tensor:
    """The entries of ``x`` (tokens on ``dim``) that ``mask`` ``[B, H, n]`` keeps, packed head after
    head: ``[kept, *rest]`` (a new tensor; nothing padded). ``index``: :func:`mask_index` of ``mask``."""
    y = x.movedim(dim, 2)
    index = mask_index(mask) if index is None else index
    return y.reshape(-1, *y.shape[3:]).index_select(0, index)


def unpack(flat: torch.Tensor, mask: torch.Tensor, dim: int = 2, fill: float = 0,
           index: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: a padded tensor with tokens on ``dim``, ``fill`` where ``mask`` is False."""
    index = mask_index(mask) if index is None else index
    out = flat.new_full((mask.numel(), *flat.shape[1:]), fill)
    out.index_copy_(0, index, flat)
    return out.view(*mask.shape, *flat.shape[1:]).movedim(2, dim)


def unpack_joined(flat: torch.Tensor, mask: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """:func:`unpack` of packed K/V ``flat`` ``[kept, D]`` into ``[B, H, width + t, D]`` (``mask``
    ``[B, H, width + t]``, False on the last ``t``), zeros on padding, with ``new`` ``[B, H, t, D]``
    written in the last ``t`` slots: the step's concatenation of past and new in one buffer."""
    b, h, n = mask.shape
    t = new.shape[-2]
    out = flat.new_zeros((b, h, n, flat.shape[-1]))
    out.view(-1, flat.shape[-1]).index_copy_(0, mask_index(mask), flat)
    out[:, :, n - t:] = new
    return out


def lengths_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, width]`` bool: entry ``j`` of head ``(b, h)`` is held (``j < lengths[b, h]``)."""
    return torch.arange(width, device=lengths.device) < lengths.unsqueeze(-1)


def gather_dim(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`gather_tokens` along ``dim`` (2 for K/V and positions, 3 for votes ``[B, H, W, n]``)."""
    if dim == 2:
        return gather_tokens(x, idx)
    return gather_tokens(x.movedim(dim, 2), idx).movedim(2, dim).contiguous()


# --------------------------------------------------------------------------- layer


class EvictingLayer(PolicyLayer, DynamicLayer):
    """A layer that holds at most ``capacity`` tokens per KV head (``ada``: in the mean over its
    heads, each head its own number -- ragged); subclasses choose which.

    Subclasses override :meth:`query_rows` (how many of the step's newest queries they need)
    and :meth:`select` (which entries to keep, usually ``self.keep(scores)``).
    """

    is_croppable = False  # evicted tokens cannot be rolled back
    # per-token policy state, name -> the dim its tokens are on; aligned with the held keys, gathered
    # (and packed, for ragged heads) together with them by the base class
    token_state: dict[str, int] = {}

    def __init__(self, cache: "EvictingCache", layer_idx: int, sliding_window: int | None, budget: int) -> None:
        DynamicLayer.__init__(self)
        self._init_policy(cache, layer_idx, sliding_window)
        self.capacity = budget if sliding_window is None else max(1, min(budget, sliding_window - 1))
        self.positions: torch.Tensor | None = None
        self.pending_query: torch.Tensor | None = None
        self.pending_step: attention.TierStep | None = None
        self.lengths: torch.Tensor | None = None  # ragged heads: [B, H] tokens each (K/V etc. packed)
        self.width = 0  # ragged heads: the longest head's tokens
        self.rank: torch.Tensor | None = None  # cake: the scores of the held tokens (earlier layers shrink by them)
        self._valid: torch.Tensor | None = None  # within a ragged step: [B, H, n] held entries of the padded keys
        self.compressed = False  # compress() ran: the layer holds the compressed context and everything after

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h = key_states.shape[:2]
        self.keys, self.values = encode_kv(self.cache.codec, key_states[..., :0, :], value_states[..., :0, :])
        self.positions = torch.empty((b, h, 0), dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def held(self) -> int:
        """Tokens of the longest head (all heads, unless ragged)."""
        if self.lengths is not None:
            return self.width
        return 0 if self.keys is None else self.keys.shape[-2]

    def past_visible(self) -> int:
        return self.held()  # ragged heads: the next step pads the shorter heads to the longest

    def kept_per_head(self) -> list[int]:
        """Tokens held by each KV head of the first sequence (for the memory report)."""
        if self.lengths is not None:
            return [int(n) for n in self.lengths[0]]
        if self.keys is None:
            return []
        return [self.keys.shape[-2]] * self.keys.shape[1]

    # -- what a policy provides ---------------------------------------------------------
    per_query_mass = False  # ``select`` gets ``mass`` per query row ([B, kv_heads, rows, n]), not summed
    select_values = False  # ``select`` also gets ``values=`` (past + new V, decoded), e.g. to weigh by ||v||

    def query_rows(self, new: int) -> int:
        """How many of the newest query rows of a ``new``-token step ``select`` needs."""
        return 0

    def select(self, keys: torch.Tensor, positions: torch.Tensor, query: torch.Tensor | None,
               query_pos: torch.Tensor, mass: torch.Tensor | None = None) -> "torch.Tensor | Kept | None":
        """The entries to keep: ascending indices ``[B, kv_heads or 1, k]``, a ragged :class:`Kept`,
        or ``None`` to keep all. Called every step on full-attention layers, after the new tokens
        were appended (``keys`` holds past + new; for ragged heads padded to the longest head,
        padding at positions :data:`BIG_POSITION`). ``query`` holds the step's newest
        :meth:`query_rows` query rows at ``query_pos``; ``mass``, when given, is the attention they
        gave ``keys`` (:func:`attention_mass` of them, taken from the model's attention; one row per
        query when :attr:`per_query_mass`; zero on padding). Scored policies end with
        ``return self.keep(scores)``."""
        raise NotImplementedError

    def keep(self, scores: torch.Tensor, protect_last: int = 0) -> "torch.Tensor | Kept | None":
        """The one way a scored policy turns its scores ``[B, kv_heads or 1, n]`` (higher = keep,
        ``+inf`` = always) into the kept entries: the cache's allocation
        (:func:`kvbound.cache.allocation.choose`) decides how many each head keeps. The newest
        ``protect_last`` entries are always kept (at most the layer's capacity of them)."""
        opts = self.cache.options
        # a compressed context holds everything that follows: keep every held entry
        capacity = scores.shape[-1] if self.capacity == self.UNBOUNDED else self.capacity
        protect = min(protect_last, capacity)
        if self.cache.allocation == "cake":
            self.rank = scores.expand(scores.shape[0], self.cache.kv_heads, scores.shape[-1]).clone()
            if protect:
                self.rank[..., -protect:] = float("inf")
        return choose(scores, capacity, self.cache.allocation, getattr(opts, "ada_floor", 0.0), self._valid, protect)

    def policy_tiers(self) -> dict[str, int]:
        """Bytes of policy state besides K/V (scores, stored votes)."""
        return {}

    def reset_policy(self) -> None:
        """Drop policy state (called by :meth:`reset`)."""

    def step_bias(self, valid: torch.Tensor | None, new: int) -> torch.Tensor | None:
        """Additive attention bias ``[B, H, n]`` of the step's keys (held + ``new``), or ``None``:
        ``-inf`` on a ragged step's padding (``valid`` False); policies with weighted tokens (a
        compensation token) add theirs."""
        if valid is None:
            return None
        return torch.zeros(valid.shape, dtype=torch.float32, device=valid.device).masked_fill_(~valid, float("-inf"))

    # -- cache protocol -------------------------------------------------------------------
    def tiers(self) -> dict[str, int]:
        tiers = {"hot_kv": nbytes(self.keys, self.values), "positions": nbytes(self.positions), **self.policy_tiers()}
        if self.lengths is not None:
            tiers["positions"] += nbytes(self.lengths)
        if self.rank is not None:
            tiers["rank"] = nbytes(self.rank)
        return tiers

    def scaling(self) -> float:
        return self.cache.driver.attention_scaling(self.layer_idx)

    def reset(self) -> None:
        """Forget everything (transformers' ``Cache.reset``), policy state included."""
        DynamicLayer.reset(self)
        self.seen = 0
        self.positions = self.pending_query = self.pending_step = self.lengths = self.rank = self._valid = None
        self.width = 0
        self.compressed = False
        self.reset_policy()

    # -- per-token state: K/V, positions, the policy's own --------------------------------------
    def _state_dims(self) -> dict[str, int]:
        return {"keys": 2, "values": 2, "positions": 2, "rank": 2, **self.token_state}

    def _unpad(self, new_kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Ragged heads: replace every packed per-token tensor by its padded ``[B, H, width, ...]``
        form for this step and return the held mask ``[B, H, width]`` (``None``: not ragged).

        With ``new_kv`` (the step's K/V; plain float K/V only) the keys and values are unpacked
        straight into the step's concatenation ``[B, H, width + new, D]`` (what :meth:`with_new`
        returns): one padded copy of the past instead of two at the step's peak."""
        if self.lengths is None:
            return None
        valid = lengths_mask(self.lengths, self.width)
        index = mask_index(valid)
        for name, dim in self._state_dims().items():
            value = getattr(self, name)
            if value is None:
                continue
            if new_kv is not None and name in ("keys", "values"):
                fresh = new_kv[0] if name == "keys" else new_kv[1]
                joined = F.pad(valid, (0, fresh.shape[-2]), value=False)
                setattr(self, name, unpack_joined(value, joined, fresh))
                continue
            setattr(self, name, unpack(value, valid, dim, BIG_POSITION if name == "positions" else 0, index))
        self.lengths = None
        return valid

    def _joins_on_unpad(self) -> bool:
        """Whether a ragged step may unpack K/V straight into the step's concatenation: plain K/V
        (no codec) and the base class's :meth:`with_new`."""
        return self.cache.codec is None and type(self).with_new is EvictingLayer.with_new

    def _hold(self, sel: "torch.Tensor | Kept | None", valid: torch.Tensor | None) -> None:
        """Keep the entries ``sel`` of every per-token tensor (now aligned with the step's keys)."""
        if sel is None and valid is not None and bool(valid.all()):
            sel, valid = None, None
        if sel is None and valid is not None:
            sel = Kept(valid, valid.sum(-1))
        if isinstance(sel, Kept):
            index = mask_index(sel.mask)
            for name, dim in self._state_dims().items():
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, pack(value, sel.mask, dim, index))
            self.lengths = sel.counts
            self.width = int(sel.counts.max()) if sel.counts.numel() else 0
        elif sel is not None:
            for name, dim in self._state_dims().items():
                value = getattr(self, name)
                if value is not None:
                    setattr(self, name, gather_dim(value, sel, dim))

    # -- beam search / several sequences per prompt: every per-sequence tensor follows --------
    batch_state: tuple[str, ...] = ("keys", "values", "positions")

    def _map_batch(self, fn) -> None:
        valid = self._unpad()
        names = {*self.batch_state, *self._state_dims()}
        for name in names:
            if getattr(self, name, None) is not None:
                setattr(self, name, fn(getattr(self, name)))
        if valid is not None:
            valid = fn(valid)
            self._hold(None, valid)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def trim(self, capacity: int) -> None:
        """Shrink to ``capacity`` tokens per head by the held tokens' scores (``cake``'s cascade:
        a later layer's measure lowered this layer's share)."""
        self.capacity = capacity
        if self.rank is None or self.held() <= capacity or self.lengths is not None:
            return
        self._hold(self.rank.topk(capacity, dim=-1).indices.sort(dim=-1).values, None)
        self.cache.account(self.layer_idx)

    def _rows(self, new: int) -> int:
        if self.compressed:  # nothing is selected any more: no scores needed
            return 0
        rows = self.query_rows(new)
        if self.cache.allocation == "cake" and new > 1:
            rows = max(rows, min(self.cache.options.cake_window, new))
        return rows

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append the step's K/V, evict down to ``capacity``, return past + new for attention.

        With kvbound's tiered attention active for this call, the scored policies' selection waits
        for the attention function: it hands over the probabilities of the newest query rows it
        computed anyway (:class:`~kvbound.attention.TierStep`), and eviction happens right after
        attention. Otherwise the query parked by the attention pre-hook is scored here. Ragged
        heads are padded for the step (attention gets a ``-inf`` bias on the padding) and packed
        again when it ends.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending_step = None  # a hand-over an interrupted pass never used
        b, h, new = key_states.shape[0], key_states.shape[1], key_states.shape[-2]
        step_pos = torch.arange(self.seen, self.seen + new, device=key_states.device)
        join = self.lengths is not None and self._joins_on_unpad()
        valid_past = self._unpad((key_states, value_states) if join else None)
        keys, values = (self.keys, self.values) if join else self.with_new(key_states, value_states)
        stored = self._stored(key_states, value_states, keys, values)
        positions = torch.cat([self.positions, step_pos.expand(b, h, new)], dim=-1)
        valid = None if valid_past is None else F.pad(valid_past, (0, new), value=True)
        bias = None if self.is_sliding else self.step_bias(valid, new)
        query, self.pending_query = self.pending_query, None
        self.seen += new
        n = keys.shape[-2]
        tiered = attention.active_cache() is self.cache

        if self.is_sliding:
            idx = None if n <= self.capacity else torch.arange(n - self.capacity, n, device=keys.device).view(1, 1, -1)
        else:
            if self.capacity != self.UNBOUNDED:  # a compressed context holds everything that follows
                self.capacity = self.cache.layer_capacity(self.layer_idx, self.seen)
            rows = self._rows(new)
            query_pos = step_pos[new - rows:] if rows else step_pos[:0]
            if valid is not None and not tiered:
                raise RuntimeError(f"{self.cache.policy_name}: ragged heads need kvbound's attention "
                                   f"(layer {self.layer_idx} ran another implementation)")
            uneven = self.cache.allocation != "uniform" or self.cache.ragged_heads  # layers hold different counts
            if tiered and (rows and query is None or bias is not None or uneven):
                self.hold_unscored(stored, positions)  # until attention scores them

                def scored(query_rows: torch.Tensor, mass: torch.Tensor) -> None:
                    self._valid = valid
                    try:
                        self._measure(keys, positions, query_rows, query_pos)
                        self._keep(stored, positions, self.select(keys, positions, query_rows, query_pos, mass,
                                                                  **self._values_arg(values)), valid)
                    finally:
                        self._valid = None
                    self.cache.note_transient(nbytes(keys, values, query_rows))

                if rows and query is None:
                    self.pending_step = attention.TierStep(keys, rows=rows, scored=scored, per_query=self.per_query_mass,
                                                           key_bias=bias, fit_mask=uneven)
                    return keys, values
                self.pending_step = attention.TierStep(keys, key_bias=bias, fit_mask=uneven)
            if rows and query is None:
                raise RuntimeError(f"{self.cache.policy_name}: no query for layer {self.layer_idx}; "
                                   "the attention hooks did not run (call the model with this cache)")
            self._valid = valid
            try:
                if self.compressed:  # holds everything after the compressed context
                    idx = None
                else:
                    self._measure(keys, positions, query, query_pos)
                    idx = self.select(keys, positions, query, query_pos, **self._values_arg(values))
            finally:
                self._valid = None
        self._keep(stored, positions, idx, valid)
        self.cache.note_transient(nbytes(keys, values, query))
        return keys, values

    def with_new(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The held K/V as attention reads them (decoded from a codec; a layer storing keys in another
        form, e.g. ThinK's pruned channels, rebuilds them here) followed by the step's new K/V."""
        held_k, held_v = decode_kv(self.cache.codec, self.keys, self.values, key_states.dtype)
        return torch.cat([held_k, key_states], dim=-2), torch.cat([held_v, value_states], dim=-2)

    def hold_unscored(self, stored: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> None:
        """Hold all of past + new (``stored``) until attention hands over the scores (tiered attention)."""
        self.keys, self.values, self.positions = stored[0], stored[1], positions

    def observe_input(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """The attention module's normed input of this step, before ``update`` (a full-attention layer;
        ThinK collects its observation queries here)."""

    def _measure(self, keys: torch.Tensor, positions: torch.Tensor, query: torch.Tensor | None,
                 query_pos: torch.Tensor) -> None:
        """``cake``: on a multi-token step, the dispersion of the newest queries' attention sets this
        layer's share (and, cascading, shrinks the layers before it)."""
        if self.cache.allocation != "cake" or query is None or query.shape[-2] < 2:
            return
        w = min(self.cache.options.cake_window, query.shape[-2])
        vis = (positions[:, :, None, :] <= query_pos[-w:][None, None, :, None])  # [B, kv, w, n]
        logits = attention.masked_logits(query[:, :, -w:], keys, vis, self.scaling(), self.cache.softcap)
        probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # [B, kv, groups, w, n]
        opts = self.cache.options
        pref = cake_preference(probs.flatten(1, 2), opts.cake_tau1, opts.cake_tau2)
        self.capacity = self.cache.cascade(self.layer_idx, pref, self.seen)

    def _values_arg(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": values} if self.select_values else {}

    # -- compressing a context prefilled elsewhere (kvpress's protocol) -----------------------
    UNBOUNDED = 1 << 62

    def compress(self, keys: torch.Tensor, values: torch.Tensor, keep: int, query: torch.Tensor | None = None,
                 mass: torch.Tensor | None = None, seen: int | None = None) -> None:
        """Hold the context ``keys``/``values`` (``[B, kv_heads, n, D]``, the newest ``n`` of its
        ``seen`` tokens: all of them but on a sliding layer, which has only its window) compressed
        by this policy's ``select`` to ``keep`` tokens per KV head, as after one ``n``-token step;
        then hold everything that follows (capacity unbounded).

        ``query`` is the post-RoPE query of the context's newest rows ``[B, heads, r, D]``: a policy
        whose :meth:`query_rows` asks for at most ``r`` rows scores them itself. ``mass`` is the
        attention every context query gave each key, summed over queries and each KV head's query
        heads ``[B, kv_heads, n]`` (what a policy that needs all ``n`` rows, like ``h2o``, takes).
        """
        positions, stored = self._start_context(keys, values, seen)
        n = keys.shape[-2]
        self.capacity = self.cache.compressed_capacity(self.layer_idx, keep, self.seen) if self.sliding_window is None \
            else max(1, min(keep, self.sliding_window - 1))
        if self.is_sliding or n <= self.capacity:
            idx = None if n <= self.capacity else torch.arange(n - self.capacity, n, device=keys.device).view(1, 1, -1)
        else:
            rows = self.query_rows(n)
            query_pos = torch.arange(self.seen - rows, self.seen, device=keys.device)
            if not rows:
                idx = self.select(keys, positions, None, query_pos, **self._values_arg(values))
            elif query is not None and query.shape[-2] >= rows:
                idx = self.select(keys, positions, query[..., query.shape[-2] - rows:, :], query_pos,
                                  **self._values_arg(values))
            elif mass is not None and not self.per_query_mass:
                idx = self.select(keys, positions, query, query_pos, mass, **self._values_arg(values))
            else:
                have = 0 if query is None else query.shape[-2]
                raise KVBoundError(f"{self.cache.policy_name} cannot compress a prefilled context with the queries "
                                   f"of its last {have} tokens: it scores with {rows}")
        self._keep(stored, positions, idx)
        self.capacity = self.UNBOUNDED

    def _start_context(self, keys: torch.Tensor, values: torch.Tensor, seen: int | None,
                       copy: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Empty this layer for :meth:`compress`'s one step over the context: ``seen`` set, and the
        context's positions ``[B, kv_heads, n]`` and K/V as stored (encoded; a copy when ``copy``,
        for a policy that writes into them)."""
        self.reset()
        self.lazy_initialization(keys, values)
        b, h, n = keys.shape[0], keys.shape[1], keys.shape[-2]
        self.seen = n if seen is None else seen
        positions = torch.arange(self.seen - n, self.seen, device=keys.device).expand(b, h, n)
        if self.cache.codec is not None:
            return positions, encode_kv(self.cache.codec, keys, values)
        return positions, ((keys.clone(), values.clone()) if copy else (keys, values))

    def _stored(self, key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the layer holds for past + new: ``keys``/``values`` themselves, or with a codec the
        held codes plus the new tokens encoded (held tokens keep their codes)."""
        if self.cache.codec is None:
            return keys, values
        new_k, new_v = encode_kv(self.cache.codec, key_states, value_states)
        return torch.cat([self.keys, new_k], dim=-2), torch.cat([self.values, new_v], dim=-2)

    def _keep(self, stored: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
              idx: "torch.Tensor | Kept | None", valid: torch.Tensor | None = None) -> None:
        """Hold the entries ``idx`` of ``stored`` (K/V or their codes), ``positions`` and the policy's
        per-token state (all when ``None``; for ragged heads all held ones, packed)."""
        self.keys, self.values, self.positions = stored[0], stored[1], positions
        self._hold(idx, valid)
        self.cache.account(self.layer_idx)


# --------------------------------------------------------------------------- cache


class EvictingCache(KVBoundCache):
    """Base cache of the eviction policies: builds one ``layer_cls`` per full-attention layer
    (sliding layers use the same class, which keeps a recent suffix there), attaches the
    observation hooks, refuses padded batches, and spreads the budget over layers and heads
    (the ``allocation`` option, :mod:`kvbound.cache.allocation`)."""

    layer_cls: type[EvictingLayer] = EvictingLayer
    ragged_heads = False  # whether heads may hold different numbers of tokens (needs kvbound's attention)
    across_layers: tuple[str, ...] = ()  # allocations of allocation.ACROSS_LAYERS the policy supports
    compresses = True  # whether compress() (kvpress's protocol) is supported

    def __init__(self, model: "PreTrainedModel", budget: int, options: Any) -> None:
        self.options = options
        self.allocation = getattr(options, "allocation", "uniform")
        if hasattr(options, "allocation"):
            check_allocation(options, budget, self.policy_name, self.across_layers)
        self.codec = tier_codec(options, model, self.policy_name) if isinstance(options, CodecOptions) else None
        self.think = think_ratio(options, self.policy_name, self.codec)  # ThinK on the kept keys (option)
        if self.think is not None and (self.allocation != "uniform" or self.ragged_heads):
            raise KVBoundError(f"{self.policy_name}: think prunes channels of equal-length heads only; "
                               f"drop think or use allocation=uniform (got allocation={self.allocation})")
        layer_cls = self.layer_cls if self.think is None else think_layer(self.layer_cls)
        self.driver = LayerDriver(model)  # clear error for unsupported families
        tiered = use_tiered_attention(model)
        if (self.ragged_heads or self.allocation != "uniform") and not tiered:
            what = "" if self.ragged_heads else f" allocation={self.allocation}"
            raise KVBoundError(f"{self.policy_name}{what} holds a different number of tokens per layer or head, "
                               "which needs kvbound's attention: load the model with attn_implementation='sdpa' "
                               f"(it runs {model.config._attn_implementation!r})")
        windows = layer_windows(model)
        layers = [layer_cls(self, i, w, budget) for i, w in enumerate(windows)]
        super().__init__(model, budget, layers)
        self.softcap = getattr(self.driver.config, "attn_logit_softcapping", None)
        self._first_full = next((i for i, w in enumerate(windows) if w is None), None)
        self.full_layers = [i for i, w in enumerate(windows) if w is None]
        self._depth = {layer: d for d, layer in enumerate(self.full_layers)}
        self.kv_heads = getattr(self.driver.config, "num_key_value_heads", None) or self.driver.config.num_attention_heads
        self._pyramid: tuple[int, list[int]] | None = None
        self.cake_prefs: dict[int, float] = {}
        self.cake_caps: dict[int, int] = {}

    # -- allocation over layers -----------------------------------------------------------
    def protected_tokens(self) -> int:
        """Newest tokens the policy always keeps (PyramidKV's cap ``n - window``)."""
        return 0

    def layer_capacity(self, layer_idx: int, seen: int) -> int:
        """Mean tokens per KV head full-attention layer ``layer_idx`` keeps after a step that
        brought it to ``seen`` tokens."""
        if self.allocation == "pyramid":
            if self._pyramid is None or self._pyramid[0] != seen:
                caps = pyramid_capacities(self.budget, len(self.full_layers), self.options.pyramid_beta, seen,
                                          self.protected_tokens())
                self._pyramid = (seen, caps)
            return self._pyramid[1][self._depth[layer_idx]]
        if self.allocation == "cake":
            return self.cake_caps.get(layer_idx, self.budget)
        return self.budget

    def compressed_capacity(self, layer_idx: int, keep: int, seen: int) -> int:
        """Mean tokens per KV head full-attention layer ``layer_idx`` keeps when a context of
        ``seen`` tokens is compressed to ``keep`` per layer (kvpress's protocol): ``pyramid`` spreads
        ``keep`` over depth as it spreads the budget while prefilling."""
        if self.allocation == "pyramid":
            return pyramid_capacities(keep, len(self.full_layers), self.options.pyramid_beta, seen,
                                      self.protected_tokens())[self._depth[layer_idx]]
        return keep

    def check_compress(self) -> None:
        """One line for what cannot compress a prefilled context: a policy without ``compress``, and
        CAKE's allocation, which sets each layer's share from its queries while prefilling."""
        if not self.compresses:
            raise KVBoundError(f"{self.policy_name} cannot compress a prefilled context; it supports the "
                               "bounded protocol (its budget held from the first prefill chunk)")
        if self.allocation == "cake":
            raise KVBoundError(f"{self.policy_name} allocation=cake sets each layer's share while prefilling; "
                               "it supports the bounded protocol, not compress")

    def cascade(self, layer_idx: int, preference: float, seen: int) -> int:
        """CAKE's cascading: record ``layer_idx``'s preference, share ``count x budget`` over the
        full-attention layers measured so far, shrink the earlier ones to their share at once
        (so the layers seen hold at most their part of the budget) and return this layer's."""
        self.cake_prefs[layer_idx] = preference
        measured = [i for i in self.full_layers if i in self.cake_prefs]
        floor = min(self.options.cake_window, self.budget)
        caps = cake_capacities([self.cake_prefs[i] for i in measured], self.budget, floor, seen)
        for i, cap in zip(measured, caps):
            self.cake_caps[i] = cap
            if i != layer_idx:
                self.layers[i].trim(cap)
        return self.cake_caps[layer_idx]

    def reset_state(self) -> None:
        self._pyramid = None
        self.cake_prefs, self.cake_caps = {}, {}

    def memory_report(self) -> dict[str, Any]:
        """The base report plus the allocation and the tokens each KV head of each layer holds
        (``kept_tokens``: one list per layer, first sequence of the batch)."""
        report = super().memory_report()
        report["allocation"] = self.allocation
        report["kept_tokens"] = [layer.kept_per_head() for layer in self.layers]
        return report

    def compress(self, context: "ContextRecorder", keep: int) -> None:
        """Take the context ``context`` recorded (see :meth:`EvictingLayer.compress`), each layer
        compressed to ``keep`` tokens; the question and the answer then go in uncompressed."""
        self.check_compress()
        seen = context.tokens()
        for layer, (keys, values, query, mass) in zip(self.layers, context.recorded()):
            layer.compress(keys, values, keep, query, mass, seen)
        self.finish_compress()

    def finish_compress(self) -> None:
        """After :meth:`compress`: nothing is evicted any more, so no layer scores or keeps per-token
        policy state (and the cache's observation hooks have nothing to do: it can share packed passes)."""
        for layer in self.layers:
            layer.compressed = True
            for name in (*layer.token_state, "rank"):
                setattr(layer, name, None)

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        layer = self.layers[layer_idx]
        if layer_idx == self._first_full:
            refuse_padding(kwargs.get("attention_mask"), self.policy_name)
        if layer.is_sliding:
            return
        layer.observe_input(hidden_states, kwargs)
        rows = layer._rows(hidden_states.shape[-2])
        if rows and attention.active_cache() is not self:  # tiered attention hands its probabilities over
            cos, sin = kwargs["position_embeddings"]
            layer.pending_query = self.driver.query(
                layer_idx, hidden_states[:, -rows:], (cos[..., -rows:, :], sin[..., -rows:, :])
            )
