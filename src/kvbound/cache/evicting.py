"""Shared machinery of the lossy eviction policies (``streaming``, ``h2o``, ``tova``, ``snapkv``).

Budget semantics
----------------
``budget`` is the most tokens a layer holds between forward passes, per KV head: every head
keeps the same number of tokens (selection is a per-head ``gather``), so the cache stays a
rectangular ``[batch, kv_heads, n, head_dim]`` tensor. Inside a step a layer returns its kept
past plus the step's new tokens to attention, then evicts down to the budget at the end of
``update`` and stores *fresh* tensors (``gather`` / ``clone``), so evicted K/V are really freed
and the accounting (which counts elements) measures what is held. The concatenation returned
to attention and the step's query are reported as transient bytes; the scoring buffer (float32
logits of a block of queries, at most :data:`kvbound.attention.MASS_BLOCK_BYTES`) is not.

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

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from transformers.cache_utils import DynamicLayer

from .. import attention
from ..errors import KVBoundError
from ..recompute import LayerDriver
from .base import KVBoundCache, PolicyLayer, nbytes
from .checks import refuse_padding
from .codec import decode_kv, encode_kv, tier_codec
from .hooks import use_tiered_attention
from .model_info import layer_windows

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

    from .context import ContextRecorder

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


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head gather of token entries: ``x`` ``[B, H, n(, D)]``, ``idx`` ``[B, H or 1, k]``.
    Returns a new tensor (never a view), so the dropped entries are freed."""
    idx = idx.expand(x.shape[0], x.shape[1], idx.shape[-1])
    if x.dim() == 4:
        return x.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))
    return x.gather(2, idx)


# --------------------------------------------------------------------------- layer


class EvictingLayer(PolicyLayer, DynamicLayer):
    """A layer that holds at most ``capacity`` tokens per KV head; subclasses choose which.

    Subclasses override :meth:`query_rows` (how many of the step's newest queries they need)
    and :meth:`select` (which entries to keep).
    """

    is_croppable = False  # evicted tokens cannot be rolled back

    def __init__(self, cache: "EvictingCache", layer_idx: int, sliding_window: int | None, budget: int) -> None:
        DynamicLayer.__init__(self)
        self._init_policy(cache, layer_idx, sliding_window)
        self.capacity = budget if sliding_window is None else max(1, min(budget, sliding_window - 1))
        self.positions: torch.Tensor | None = None
        self.pending_query: torch.Tensor | None = None
        self.pending_step: attention.TierStep | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h = key_states.shape[:2]
        self.keys, self.values = encode_kv(self.cache.codec, key_states[..., :0, :], value_states[..., :0, :])
        self.positions = torch.empty((b, h, 0), dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def held(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    # -- what a policy provides ---------------------------------------------------------
    per_query_mass = False  # ``select`` gets ``mass`` per query row ([B, kv_heads, rows, n]), not summed

    def query_rows(self, new: int) -> int:
        """How many of the newest query rows of a ``new``-token step ``select`` needs."""
        return 0

    def select(self, keys: torch.Tensor, positions: torch.Tensor, query: torch.Tensor | None,
               query_pos: torch.Tensor, mass: torch.Tensor | None = None) -> torch.Tensor | None:
        """Indices ``[B, kv_heads or 1, capacity]`` (ascending) of the entries to keep, or
        ``None`` to keep all. Called every step on full-attention layers, after the new
        tokens were appended (``keys`` holds past + new). ``query`` holds the step's newest
        :meth:`query_rows` query rows at ``query_pos``; ``mass``, when given, is the attention
        they gave ``keys`` (:func:`attention_mass` of them, taken from the model's attention;
        one row per query when :attr:`per_query_mass`)."""
        raise NotImplementedError

    def policy_tiers(self) -> dict[str, int]:
        """Bytes of policy state besides K/V (scores, stored votes)."""
        return {}

    def reset_policy(self) -> None:
        """Drop policy state (called by :meth:`reset`)."""

    # -- cache protocol -------------------------------------------------------------------
    def tiers(self) -> dict[str, int]:
        return {"hot_kv": nbytes(self.keys, self.values), "positions": nbytes(self.positions), **self.policy_tiers()}

    def scaling(self) -> float:
        return self.cache.driver.attention_scaling(self.layer_idx)

    def reset(self) -> None:
        """Forget everything (transformers' ``Cache.reset``), policy state included."""
        DynamicLayer.reset(self)
        self.seen = 0
        self.positions = self.pending_query = self.pending_step = None
        self.reset_policy()

    # -- beam search / several sequences per prompt: every per-sequence tensor follows --------
    batch_state: tuple[str, ...] = ("keys", "values", "positions")

    def _map_batch(self, fn) -> None:
        for name in self.batch_state:
            if getattr(self, name) is not None:
                setattr(self, name, fn(getattr(self, name)))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        """Append the step's K/V, evict down to ``capacity``, return past + new for attention.

        With kvbound's tiered attention active for this call, the scored policies' selection waits
        for the attention function: it hands over the probabilities of the newest query rows it
        computed anyway (:class:`~kvbound.attention.TierStep`), and eviction happens right after
        attention. Otherwise the query parked by the attention pre-hook is scored here.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending_step = None  # a hand-over an interrupted pass never used
        b, h, new = key_states.shape[0], key_states.shape[1], key_states.shape[-2]
        step_pos = torch.arange(self.seen, self.seen + new, device=key_states.device)
        held_k, held_v = decode_kv(self.cache.codec, self.keys, self.values, key_states.dtype)
        keys = torch.cat([held_k, key_states], dim=-2)
        values = torch.cat([held_v, value_states], dim=-2)
        stored = self._stored(key_states, value_states, keys, values)
        positions = torch.cat([self.positions, step_pos.expand(b, h, new)], dim=-1)
        query, self.pending_query = self.pending_query, None
        self.seen += new
        n = keys.shape[-2]

        if self.is_sliding:
            idx = None if n <= self.capacity else torch.arange(n - self.capacity, n, device=keys.device).view(1, 1, -1)
        else:
            rows = self.query_rows(new)
            query_pos = step_pos[new - rows:] if rows else step_pos[:0]
            if rows and query is None and attention.active_cache() is self.cache:
                self.keys, self.values, self.positions = stored[0], stored[1], positions  # until attention scores them

                def scored(query_rows: torch.Tensor, mass: torch.Tensor) -> None:
                    self._keep(stored, positions, self.select(keys, positions, query_rows, query_pos, mass))
                    self.cache.note_transient(nbytes(keys, values, query_rows))

                self.pending_step = attention.TierStep(keys, rows=rows, scored=scored, per_query=self.per_query_mass)
                return keys, values
            if rows and query is None:
                raise RuntimeError(f"{self.cache.policy_name}: no query for layer {self.layer_idx}; "
                                   "the attention hooks did not run (call the model with this cache)")
            idx = self.select(keys, positions, query, query_pos)
        self._keep(stored, positions, idx)
        self.cache.note_transient(nbytes(keys, values, query))
        return keys, values

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
        self.reset()
        self.lazy_initialization(keys, values)
        b, h, n = keys.shape[0], keys.shape[1], keys.shape[-2]
        self.seen = n if seen is None else seen
        self.capacity = keep if self.sliding_window is None else max(1, min(keep, self.sliding_window - 1))
        positions = torch.arange(self.seen - n, self.seen, device=keys.device).expand(b, h, n)
        stored = (keys, values) if self.cache.codec is None else encode_kv(self.cache.codec, keys, values)
        if self.is_sliding or n <= self.capacity:
            idx = None if n <= self.capacity else torch.arange(n - self.capacity, n, device=keys.device).view(1, 1, -1)
        else:
            rows = self.query_rows(n)
            query_pos = torch.arange(self.seen - rows, self.seen, device=keys.device)
            if not rows:
                idx = self.select(keys, positions, None, query_pos)
            elif query is not None and query.shape[-2] >= rows:
                idx = self.select(keys, positions, query[..., query.shape[-2] - rows:, :], query_pos)
            elif mass is not None and not self.per_query_mass:
                idx = self.select(keys, positions, query, query_pos, mass)
            else:
                have = 0 if query is None else query.shape[-2]
                raise KVBoundError(f"{self.cache.policy_name} cannot compress a prefilled context with the queries "
                                   f"of its last {have} tokens: it scores with {rows}")
        self._keep(stored, positions, idx)
        self.capacity = self.UNBOUNDED

    def _stored(self, key_states: torch.Tensor, value_states: torch.Tensor, keys: torch.Tensor,
                values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the layer holds for past + new: ``keys``/``values`` themselves, or with a codec the
        held codes plus the new tokens encoded (held tokens keep their codes)."""
        if self.cache.codec is None:
            return keys, values
        new_k, new_v = encode_kv(self.cache.codec, key_states, value_states)
        return torch.cat([self.keys, new_k], dim=-2), torch.cat([self.values, new_v], dim=-2)

    def _keep(self, stored: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor,
              idx: torch.Tensor | None) -> None:
        """Hold the entries ``idx`` of ``stored`` (K/V or their codes) and ``positions`` (all when ``None``)."""
        keep_k, keep_v = stored
        if idx is None:
            self.keys, self.values, self.positions = keep_k, keep_v, positions
        else:
            self.keys, self.values = gather_tokens(keep_k, idx), gather_tokens(keep_v, idx)
            self.positions = gather_tokens(positions, idx)
        self.cache.account(self.layer_idx)


# --------------------------------------------------------------------------- cache


class EvictingCache(KVBoundCache):
    """Base cache of the eviction policies: builds one ``layer_cls`` per full-attention layer
    (sliding layers use the same class, which keeps a recent suffix there), attaches the
    observation hooks and refuses padded batches."""

    layer_cls: type[EvictingLayer] = EvictingLayer

    def __init__(self, model: "PreTrainedModel", budget: int, options: Any) -> None:
        self.options = options
        self.codec = tier_codec(options, model, self.policy_name)  # hot window kept through a codec (option)
        self.driver = LayerDriver(model)  # clear error for unsupported families
        use_tiered_attention(model)
        windows = layer_windows(model)
        layers = [self.layer_cls(self, i, w, budget) for i, w in enumerate(windows)]
        super().__init__(model, budget, layers)
        self.softcap = getattr(self.driver.config, "attn_logit_softcapping", None)
        self._first_full = next((i for i, w in enumerate(windows) if w is None), None)

    def compress(self, context: "ContextRecorder", keep: int) -> None:
        """Take the context ``context`` recorded (see :meth:`EvictingLayer.compress`), each layer
        compressed to ``keep`` tokens; the question and the answer then go in uncompressed."""
        seen = context.tokens()
        for layer, (keys, values, query, mass) in zip(self.layers, context.recorded()):
            layer.compress(keys, values, keep, query, mass, seen)

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        layer = self.layers[layer_idx]
        if layer_idx == self._first_full:
            refuse_padding(kwargs.get("attention_mask"), self.policy_name)
        if layer.is_sliding:
            return
        rows = layer.query_rows(hidden_states.shape[-2])
        if rows and attention.active_cache() is not self:  # tiered attention hands its probabilities over
            cos, sin = kwargs["position_embeddings"]
            layer.pending_query = self.driver.query(
                layer_idx, hidden_states[:, -rows:], (cos[..., -rows:, :], sin[..., -rows:, :])
            )
