"""A full cache that also records what the eviction policies score a context with, so that one
prefill serves every policy and compression ratio (kvpress's protocol, ``kvbound bench --scenario
ruler --protocol compress``).

While the context is prefilled (in chunks, through the model's own attention: kvbound's tiered
attention hands each step's probabilities over, as for ``h2o``), each layer keeps

* every token's K/V (nothing is evicted: attention is the full cache's);
* the post-RoPE queries of the newest ``window`` tokens (``snapkv``'s observation window, ``tova``'s
  last query), ``[B, heads, window, D]``;
* the attention mass each key received from every context query, summed over queries and the
  query heads of its KV head, ``[B, kv_heads, n]`` (``h2o``'s accumulated score);
* with ``inputs=True``, every context token's attention input (the normed hidden state the
  layer's projections read), ``[B, n, hidden]`` (``expected-attention``'s query statistics).

The cache also keeps the context's token ids (``kvzip`` reconstructs the context from them) and a
``shared`` dict where a policy leaves what every ratio can reuse (``kvzip``'s scores: one
reconstruction per context, not one per ratio).

:meth:`kvbound.cache.evicting.EvictingCache.compress` then builds each policy's compressed copy
from :meth:`ContextRecorder.recorded`. Not a registered policy: a tool of the bench.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import nbytes
from .evicting import EvictingCache, EvictingLayer
from .codec import CodecOptions


@dataclass
class ContextOptions(CodecOptions):
    window: int = 64  # newest query rows kept (>= every scorer's window: snapkv 32, tova 1)


class RecordingLayer(EvictingLayer):
    """Keeps everything; records the newest ``window`` queries and the summed attention mass."""

    batch_state = (*EvictingLayer.batch_state, "mass", "queries", "inputs")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        if not self.is_sliding:  # sliding layers keep their window, as every policy does there
            self.capacity = self.UNBOUNDED
        self.mass: torch.Tensor | None = None  # [B, kv_heads, held]
        self.queries: torch.Tensor | None = None  # [B, heads, <= window, D]
        self.inputs: torch.Tensor | None = None  # [B, n, hidden] with the recorder's inputs=True

    def query_rows(self, new: int) -> int:
        return new

    def policy_tiers(self) -> dict[str, int]:
        return {"mass": nbytes(self.mass), "queries": nbytes(self.queries), "inputs": nbytes(self.inputs)}

    def reset_policy(self) -> None:
        self.mass = self.queries = self.inputs = None

    def observe_input(self, hidden_states: torch.Tensor, kwargs: dict) -> None:
        if self.cache.record_inputs:
            rows = hidden_states.detach().clone()
            self.inputs = rows if self.inputs is None else torch.cat([self.inputs, rows], dim=1)

    def select(self, keys, positions, query, query_pos, mass=None):
        from .evicting import attention_mass

        if mass is None:
            mass = attention_mass(query, query_pos, keys, positions, self.scaling(), self.cache.softcap)
        old = self.mass if self.mass is not None else mass.new_zeros(*mass.shape[:2], 0)
        self.mass = torch.nn.functional.pad(old, (0, mass.shape[-1] - old.shape[-1])) + mass
        rows = query if self.queries is None else torch.cat([self.queries, query], dim=-2)
        self.queries = rows[..., max(0, rows.shape[-2] - self.cache.options.window):, :].clone()
        return None


class ContextRecorder(EvictingCache):
    """Prefill a context through this cache once; :meth:`recorded` is what
    :meth:`~kvbound.cache.evicting.EvictingCache.compress` takes."""

    layer_cls = RecordingLayer
    policy_name = "context-recorder"

    def __init__(self, model, window: int = 64, inputs: bool = False) -> None:
        self.record_inputs = inputs
        super().__init__(model, RecordingLayer.UNBOUNDED, ContextOptions(window=window))
        self.ids: torch.Tensor | None = None  # [B, n] the context's token ids
        self.shared: dict[str, Any] = {}  # what a policy computed once for this context (see the module docstring)

    def observe_input_ids(self, input_ids: torch.Tensor | None) -> None:
        if input_ids is not None:
            self.ids = input_ids if self.ids is None else torch.cat([self.ids, input_ids.to(self.ids.device)], dim=1)

    def extra_tiers(self) -> dict[str, int]:
        return {"token_ids": nbytes(self.ids)}

    exact = True  # holds every token: attention is the full cache's
    reruns_model = False

    def recorded(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]:
        """Per layer: ``(keys, values, newest queries, summed mass)`` of the context (a sliding
        layer holds only its window's newest tokens, and no queries or mass)."""
        return [(layer.keys, layer.values, layer.queries, layer.mass) for layer in self.layers]

    def tokens(self) -> int:
        """How many context tokens were prefilled."""
        return self.layers[0].seen

    def attention_inputs(self) -> list[torch.Tensor | None]:
        """Per layer: every context token's attention input ``[B, n, hidden]`` (``None`` on sliding
        layers, or for every layer unless the recorder was made with ``inputs=True``)."""
        return [layer.inputs for layer in self.layers]
