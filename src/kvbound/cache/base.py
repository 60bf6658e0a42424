"""Layer protocol and memory accounting (the registry is :mod:`kvbound.cache.registry`).

Every policy is a :class:`PolicyLayer` subclass (one per model layer) living inside a
:class:`KVBoundCache`, which is a transformers ``DynamicCache`` and therefore plugs into
``model.generate(past_key_values=cache)``.

Memory is measured on the tensors actually held, never estimated:

* ``hot_kv`` -- K/V held for attention between forward passes (per layer ``PolicyLayer.tiers``);
* other tiers (``checkpoints``, ``offloaded``...) -- whatever else a policy keeps;
* transient -- the largest temporary buffers a policy allocates inside one step
  (reported with :meth:`KVBoundCache.note_transient`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import DynamicCache

from ..errors import KVBoundError
from .model_info import kv_bytes_per_token, text_config
from .registry import get_policy, parse_options

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


def nbytes(*tensors: torch.Tensor | None) -> int:
    """Bytes held by the given tensors (``None`` counts as 0)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Per-head gather of token entries: ``x`` ``[B, H, n(, D)]`` (any dtype: K/V, codes, scales,
    positions), ``idx`` ``[B, H or 1, k]``. Returns a new tensor (never a view), so the dropped
    entries are freed."""
    b, h, n = x.shape[:3]
    idx = idx.expand(b, h, idx.shape[-1])
    # one index_select of whole rows over the flattened (batch, head, token) axis: row copies, where
    # ``gather`` with an expanded index reads an index per element (7x slower on this CPU for one
    # layer's 513 x 64 float32 keys, 176 vs 23 us, in a one-off timing)
    rows = (idx + torch.arange(0, b * h * n, n, device=idx.device).view(b, h, 1)).reshape(-1)
    out = x.new_empty(b, h, idx.shape[-1], *x.shape[3:])  # its own storage (not a view): the rest is freed
    torch.index_select(x.reshape(b * h * n, *x.shape[3:]), 0, rows, out=out.view(-1, *x.shape[3:]))
    return out


# ----------------------------------------------------------------- batch maps (beam search)


def kv_bytes(like: torch.Tensor, tokens: int) -> int:
    """Bytes of ``tokens`` tokens of K and V shaped and typed like ``like`` ``[B, kv_heads, n, D]``."""
    return 2 * like.shape[0] * like.shape[1] * tokens * like.shape[-1] * like.element_size()


def by_beam(beam_idx: torch.Tensor):
    """Batch map of ``reorder_cache``: row ``i`` becomes row ``beam_idx[i]``."""
    return lambda t: t.index_select(0, beam_idx.to(t.device))


def repeated(repeats: int):
    """Batch map of ``batch_repeat_interleave``."""
    return lambda t: t.repeat_interleave(repeats, dim=0)


def selected(indices: torch.Tensor):
    """Batch map of ``batch_select_indices``."""
    return lambda t: t[indices, ...]


# --------------------------------------------------------------------------- layers


class PolicyLayer:
    """Mixin giving one cache layer kvbound's bookkeeping.

    Concrete layers combine it with ``DynamicLayer`` (or ``DynamicSlidingWindowLayer``)
    and implement ``update``. Attributes available to subclasses:

    * ``cache`` -- the owning :class:`KVBoundCache` (budget, model, options, accounting);
    * ``layer_idx``;
    * ``sliding_window`` -- the model's window for sliding layers, else ``None``;
    * ``seen`` -- logical number of tokens this layer has been given.
    """

    def _init_policy(self, cache: "KVBoundCache", layer_idx: int, sliding_window: int | None) -> None:
        self.cache = cache
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None  # transformers builds each mask from a layer of its kind
        self.seen = 0

    # -- what transformers asks ------------------------------------------------------
    def past_visible(self) -> int:
        """How many past keys the next ``update`` returns before the new ones."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past = self.past_visible()
        return past + query_length, self.seen - past

    def get_max_length(self) -> int:
        return -1

    # -- rollback (speculative decoding) --------------------------------------------
    def truncate(self, n: int) -> None:
        """Forget the last ``n`` tokens this layer was given (``seen -= n``).

        Policies that can roll back override this; the default refuses with a clear error.
        """
        raise KVBoundError(
            f"policy {self.cache.policy_name!r} cannot roll back tokens (needed to verify speculative drafts); "
            "use an exact policy that can: offload, kv-direct or full"
        )

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' rollback API: negative = remove that many tokens, else keep that many."""
        n = -tokens_to_remove if tokens_to_remove < 0 else self.seen - tokens_to_remove
        if n > 0:
            self.truncate(n)

    # -- reset and batch reordering (beam search) -------------------------------------
    def reset(self) -> None:
        """Forget everything (transformers' ``Cache.reset``): the layer is as new."""
        super().reset()  # the transformers layer class this mixin is combined with
        self.seen = 0

    def map_batch(self, fn) -> None:
        """Apply ``fn`` (a map of the batch dimension) to every per-sequence tensor held.
        Layers holding more per-sequence state than the hot K/V extend it."""
        if self.keys is not None:
            self.keys, self.values = fn(self.keys), fn(self.values)
        self.cache.account(self.layer_idx)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.map_batch(by_beam(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.map_batch(repeated(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.map_batch(selected(indices))

    # -- memory ---------------------------------------------------------------------
    def tiers(self) -> dict[str, int]:
        """Bytes this layer holds between forward passes, by tier."""
        return {"hot_kv": nbytes(self.keys, self.values)}


# --------------------------------------------------------------------------- cache


class KVBoundCache(DynamicCache):
    """Base cache: a ``DynamicCache`` whose layers follow one policy and report memory."""

    policy_name: str = "?"
    lossless: bool = True  # False when an option makes this instance lossy (a K/V codec, kvbound.cache.codec)

    def __init__(self, model: "PreTrainedModel", budget: int | None, layers: list) -> None:
        # Skip DynamicCache.__init__ (it would build its own layers from the config).
        super(DynamicCache, self).__init__(layers=layers)
        self.model = model
        self.budget = budget
        self._hot_by_layer = [0] * len(layers)
        self.peak_hot_kv_bytes = 0
        self.peak_transient_bytes = 0
        self.kv_bytes_per_token = kv_bytes_per_token(model)
        self.num_layers = text_config(model).num_hidden_layers

    @classmethod
    def prepare(cls, model: "PreTrainedModel") -> bool:
        """Once per model, before a cache is built: what the policy measures and caches on disk
        (``razor``'s head map). Benchmarks call it before they start measuring a run. Returns
        whether it measured (ran the model) rather than read what it had cached."""
        return False

    @classmethod
    def parse_options(cls, options: dict[str, Any]):
        """This policy's options dataclass (registered with it) built from ``options``."""
        return parse_options(get_policy(cls.policy_name).options, options, cls.policy_name)

    @property
    def exact(self) -> bool:
        """This instance's promise: its policy's (the registry's ``exact``), unless its options made
        it lossy (e.g. ``offload`` with ``codec=int8``)."""
        return get_policy(self.policy_name).exact and self.lossless

    @property
    def reruns_model(self) -> bool:
        """Whether every forward pass re-runs the model over the evicted span (the registry's
        ``reruns_model``): each step then has prefill-sized transients."""
        return get_policy(self.policy_name).reruns_model

    # -- hooks (see kvbound.cache.hooks); policies override what they need ------
    def observe_input_ids(self, input_ids: torch.Tensor | None) -> None:
        """Called before each forward pass with its input ids (``None`` for embeddings)."""

    def observe_layer_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Called before decoder layer ``layer_idx`` with its pre-norm residual input."""

    def observe_attention_input(self, layer_idx: int, hidden_states: torch.Tensor, kwargs: dict) -> None:
        """Called before the attention module of ``layer_idx`` with its normed input."""

    def observe_output(self) -> None:
        """Called when the base model's forward pass has run every layer (before the LM head): a
        policy that decides once all layers hold the step (``kvzip``) acts here."""

    def absorb_prompt(self, input_ids: torch.Tensor) -> bool:
        """Take prompt tokens without a forward pass, if this policy can (``kv-direct`` rebuilds
        them from their ids in the next pass). Returns whether it did; ``False`` here."""
        return False

    # -- accounting -------------------------------------------------------------------
    def account(self, layer_idx: int) -> None:
        """Record the hot K/V bytes ``layer_idx`` holds now (call at the end of ``update``)."""
        self._hot_by_layer[layer_idx] = self.layers[layer_idx].tiers().get("hot_kv", 0)
        self.peak_hot_kv_bytes = max(self.peak_hot_kv_bytes, sum(self._hot_by_layer))

    def note_transient(self, nbytes_now: int) -> None:
        """Record bytes of temporary buffers alive together inside one step."""
        self.peak_transient_bytes = max(self.peak_transient_bytes, int(nbytes_now))

    @property
    def tokens_seen(self) -> int:
        return self.get_seq_length()

    def bytes_by_tier(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for layer in self.layers:
            for tier, b in layer.tiers().items():
                out[tier] = out.get(tier, 0) + b
        for tier, b in self.extra_tiers().items():
            out[tier] = out.get(tier, 0) + b
        return out

    def extra_tiers(self) -> dict[str, int]:
        """Bytes held by the cache outside its layers (e.g. token-id checkpoints)."""
        return {}

    def memory_report(self) -> dict[str, Any]:
        tiers = self.bytes_by_tier()
        return {
            "policy": self.policy_name,
            "exact": self.exact,
            "budget": self.budget,
            "tokens_seen": self.tokens_seen,
            "hot_kv_bytes": tiers.get("hot_kv", 0),
            "peak_hot_kv_bytes": self.peak_hot_kv_bytes,
            "bytes_by_tier": tiers,
            "total_bytes": sum(tiers.values()),
            "peak_transient_bytes": self.peak_transient_bytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
        }

    def truncate(self, n: int) -> None:
        """Forget the last ``n`` tokens (roll back a rejected speculative draft).

        Every layer rolls back (:meth:`PolicyLayer.truncate`); policies that cannot raise
        :class:`~kvbound.errors.KVBoundError`.
        """
        seen = self.get_seq_length()
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= seen:
            raise KVBoundError(f"can truncate 0..{seen} tokens (the tokens seen), got {n!r}")
        if n:
            for layer in self.layers:
                layer.truncate(n)

    # -- reset and batch reordering ---------------------------------------------------------
    def reset(self) -> None:
        """Forget everything, as a new cache: every layer, the policy's own state and the peaks."""
        super().reset()
        self.reset_state()
        self._hot_by_layer = [0] * len(self.layers)
        self.peak_hot_kv_bytes = 0
        self.peak_transient_bytes = 0

    def reset_state(self) -> None:
        """Drop per-cache policy state kept outside the layers (e.g. token ids); see :meth:`reset`."""

    def map_batch_state(self, fn) -> None:
        """Apply ``fn`` (a map of the batch dimension) to per-cache per-sequence state (e.g. token ids)."""

    def _batch_op(self, op: str, arg: Any, fn) -> None:
        """Run the layers' ``op`` (they map their own state), then the cache's own state; refused
        with a clear error when the registry says the policy cannot reorder batches."""
        if not get_policy(self.policy_name).beams:
            raise KVBoundError(f"policy {self.policy_name!r} does not support {op} (beam search and batch "
                               "reordering); use num_beams=1, or a policy that does (see kvbound --help)")
        for layer in self.layers:
            getattr(layer, op)(arg)
        self.map_batch_state(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every sequence's state follows its beam (hot K/V, stores, token ids)."""
        self._batch_op("reorder_cache", beam_idx, by_beam(beam_idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_op("batch_repeat_interleave", repeats, repeated(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._batch_op("batch_select_indices", indices, selected(indices))

    def close(self) -> None:
        """Release external resources (files); a no-op for in-memory policies."""
