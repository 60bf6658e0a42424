"""ThinK's key-channel pruning (Xu et al. 2024, "ThinK: Thinner Key Cache by Query-Driven Pruning",
https://arxiv.org/abs/2407.21018), as a mixin for any token-eviction layer.

Rule (per KV head)
------------------
Each key channel ``c`` is scored by ``||Q_w[:, c]|| * ||K[:, c]||``: ``Q_w`` are the post-RoPE queries
of the observation window (the newest ``window`` query rows: the policy's ``window`` option where it has
one, ``think`` and ``snapkv``, else 32 as in SnapKV and ThinK), ``K`` the keys
the layer keeps (after token selection: ThinK runs on top of SnapKV/H2O). With grouped-query attention
the score is averaged over the query heads that read the KV head. The ``floor(ratio * head_dim)``
lowest-scoring channels are pruned; the kept channel indices are chosen once, the first time a key
is pruned (the prompt's last chunk of ``window`` queries when the prompt comes in one pass), and kept
for the rest of the sequence.

Storage
-------
The keys of the newest ``window`` entries a head holds keep all channels (the observation window and
the tokens generated since, as in ThinK); older keys are stored pruned, ``[B, kv_heads, n_old, d_keep]``,
with the channel index ``[B, kv_heads, d_keep]``. The pruned channels are not stored (kvpress zeroes
them, which saves nothing). Values are untouched.

Attention
---------
The keys returned to attention are rebuilt at ``head_dim`` with the pruned channels zero-filled:
``q . k`` over the kept channels equals ``q . k_zero_filled`` exactly (the pruned channels add
``q_c * 0``), so the model's own attention (sdpa, eager or kvbound's tiered attention) computes
ThinK's pruned-query product ``q[kept] . k[kept]`` without a kernel of its own. The rebuilt tensor is a
per-step transient like the concatenation every eviction policy returns.

Composition
-----------
:func:`think_layer` derives ``ThinK<Layer>`` from any :class:`~kvbound.cache.evicting.EvictingLayer`
subclass; :class:`~kvbound.cache.evicting.EvictingCache` does so when the options carry ``think``
(every token-eviction policy: ``snapkv --option think=0.5``), and :mod:`kvbound.cache.think` is the
policy that keeps every token and prunes channels only. Not combined with a codec for the kept tokens
(integer codes are packed along the channels).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..errors import KVBoundError
from .base import gather_tokens, nbytes

WINDOW = 32  # observation window and full-key recent window where the policy has no `window` (ThinK, SnapKV)


def think_ratio(options: Any, policy: str, codec: Any = None) -> float | None:
    """The pruned fraction ``options`` ask for (``think`` of an eviction policy, ``ratio`` of ``think``),
    checked: a number in (0, 1), and no codec beside it. ``None`` when ThinK is off."""
    name = "ratio" if policy == "think" else "think"
    ratio = getattr(options, name, None)
    if ratio is None and name == "think":
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise KVBoundError(f"{policy} option {name} is the fraction of key channels pruned and must be "
                           f"in (0, 1), got {ratio!r}")
    if codec is not None:
        raise KVBoundError(f"{policy}: ThinK's channel pruning does not combine with a codec "
                           "(integer codes are packed along the channels); drop codec or think")
    return float(ratio)


def kept_channels(head_dim: int, ratio: float) -> int:
    """Channels kept per head: ``head_dim - floor(ratio * head_dim)`` (at least one)."""
    return max(1, head_dim - int(ratio * head_dim))


def channel_scores(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """ThinK's score ``||Q[:, c]|| * ||K[:, c]||`` per KV head, averaged over its query heads.

    ``query`` ``[B, heads, w, D]`` (the observation window), ``keys`` ``[B, kv_heads, n, D]``.
    Returns ``[B, kv_heads, D]`` float32."""
    b, heads, _, d = query.shape
    kv_heads = keys.shape[1]
    q_norm = query.float().norm(dim=-2).view(b, kv_heads, heads // kv_heads, d)  # [B, kv, G, D]
    return (q_norm * keys.float().norm(dim=-2).unsqueeze(2)).mean(dim=2)


def choose_channels(query: torch.Tensor, keys: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices ``[B, kv_heads, d_keep]`` (ascending) of the key channels ThinK keeps."""
    scores = channel_scores(query, keys)
    return scores.topk(kept_channels(keys.shape[-1], ratio), dim=-1).indices.sort(dim=-1).values


def _channel_index(channels: torch.Tensor, tokens: int) -> torch.Tensor:
    return channels.unsqueeze(2).expand(channels.shape[0], channels.shape[1], tokens, channels.shape[-1])


def _take(keys: torch.Tensor, idx: torch.Tensor | None, n_old: int | None = None,
          channels: torch.Tensor | None = None) -> torch.Tensor:
    """Entries ``idx`` ``[B, kv_heads, k]`` of ``keys`` ``[B, kv_heads, n, D]`` (all when ``None``), or with
    ``channels`` the first ``n_old`` of them at those channels only: one gather of ``n_old * d_keep``
    values through flat indices, never the full-width rows."""
    b, h, n, d = keys.shape
    if channels is None:
        return gather_tokens(keys, idx)
    rows = torch.arange(n_old, device=keys.device).expand(b, h, n_old) if idx is None else idx[..., :n_old]
    flat = (rows.unsqueeze(-1) * d + channels.unsqueeze(2)).reshape(b, h, -1)
    return keys.reshape(b, h, n * d).gather(-1, flat).view(b, h, n_old, channels.shape[-1])


class ThinKMixin:
    """Key-channel pruning on top of an ``EvictingLayer``'s token selection (see the module doc).

    Extra state: ``pruned_keys`` ``[B, kv_heads, n_old, d_keep]`` (the older kept keys), ``channels``
    ``[B, kv_heads, d_keep]``, and until the channels are chosen ``think_queries`` (the newest
    ``window`` post-RoPE queries). ``keys`` holds the newest ``<= window`` entries at full width;
    entries run ``pruned_keys`` then ``keys``, in the order of ``positions``. Sliding-window layers
    (Gemma 3) are left as the base layer keeps them.
    """

    pruned_keys: torch.Tensor | None = None
    channels: torch.Tensor | None = None
    think_queries: torch.Tensor | None = None

    @property
    def think_window(self) -> int:
        """The policy's own observation window where it has one (``think``, ``snapkv``), else :data:`WINDOW`."""
        return getattr(self.cache.options, "window", WINDOW)

    # -- counts -------------------------------------------------------------------------
    def _pruned(self) -> int:
        return 0 if self.pruned_keys is None else self.pruned_keys.shape[-2]

    def held(self) -> int:
        return super().held() + self._pruned()

    # -- the observation window ------------------------------------------------------------
    def observe_input(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        super().observe_input(hidden_states, kwargs)
        if self.channels is not None or self.capacity <= self.think_window:  # chosen, or never any key to prune
            return
        w = self.think_window
        rows = min(w, hidden_states.shape[-2])
        cos, sin = kwargs["position_embeddings"]
        q = self.cache.driver.query(self.layer_idx, hidden_states[:, -rows:],
                                    (cos[..., -rows:, :], sin[..., -rows:, :]))
        if self.think_queries is not None:
            q = torch.cat([self.think_queries, q], dim=-2)[..., -w:, :]
        self.think_queries = q

    # -- storage ----------------------------------------------------------------------------
    def with_new(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self._pruned()
        if not m:
            return super().with_new(key_states, value_states)
        recent = self.keys
        b, h, r, d = recent.shape
        keys = recent.new_empty(b, h, m + r + key_states.shape[-2], d)  # one buffer, filled in place
        keys[:, :, :m].zero_().scatter_(-1, _channel_index(self.channels, m), self.pruned_keys)
        keys[:, :, m:m + r] = recent
        keys[:, :, m + r:] = key_states
        return keys, torch.cat([self.values, value_states], dim=-2)

    def hold_unscored(self, stored, positions) -> None:
        super().hold_unscored(stored, positions)  # keys: every entry at full width (pruned ones zero-filled)
        self.pruned_keys = None

    def _keep(self, stored, positions, idx, valid=None) -> None:
        if self.is_sliding:
            return super()._keep(stored, positions, idx, valid)
        keys = stored[0]  # every entry at full width, the pruned ones zero-filled
        self.keys, self.values, self.positions = None, stored[1], positions
        self._hold(idx, valid)  # the base selection for values, positions and the policy's per-token state
        n = keys.shape[-2]
        kept = n if idx is None else idx.shape[-1]
        n_old = kept - min(kept, self.think_window)
        if idx is not None:
            idx = idx.expand(keys.shape[0], keys.shape[1], kept)
        if n_old and self.channels is None:  # chosen once, from the observation window and the kept keys
            if self.think_queries is None:
                raise RuntimeError(f"{self.cache.policy_name}: no observation queries for layer "
                                   f"{self.layer_idx}; the attention hooks did not run")
            self.channels = choose_channels(self.think_queries, keys if idx is None else _take(keys, idx), self.cache.think)
            self.think_queries = None
        # one gather each: the older kept keys at their kept channels only, the newest at full width
        self.pruned_keys = _take(keys, idx, n_old, self.channels) if n_old else None
        recent = keys[:, :, n_old:] if idx is None else _take(keys, idx[..., n_old:])
        self.keys = recent.clone() if recent._base is not None else recent  # fresh: the full-width copy is freed
        self.cache.account(self.layer_idx)

    def tiers(self) -> dict[str, int]:
        out = super().tiers()
        out["hot_kv"] += nbytes(self.pruned_keys)
        out["channels"] = nbytes(self.channels)
        out["think_queries"] = nbytes(self.think_queries)
        return out

    def reset_policy(self) -> None:
        super().reset_policy()
        self.pruned_keys = self.channels = self.think_queries = None

    def adopt_recent(self, *args: Any, **kwargs: Any) -> None:
        raise KVBoundError(f"{self.cache.policy_name} with ThinK channel pruning cannot restart as a speculative draft")


@functools.lru_cache(maxsize=None)
def think_layer(layer_cls: type) -> type:
    """``ThinK<layer_cls>``: ``layer_cls`` (an ``EvictingLayer`` subclass) with ThinK's channel pruning."""
    return type(f"ThinK{layer_cls.__name__}", (ThinKMixin, layer_cls),
                {"batch_state": (*layer_cls.batch_state, "pruned_keys", "channels", "think_queries"),
                 "__doc__": f"{layer_cls.__name__} whose older kept keys are stored channel-pruned (ThinK)."})
