"""Drive a model's own modules to rebuild K/V: the only family-specific code in kvbound.

Two services, both built from the model's own modules (no copied math):

* :class:`LayerDriver` -- for a span of tokens, run decoder layer ``l`` on the span's
  residual stream (producing layer ``l``'s K/V and the residual entering ``l+1``), project
  a stored residual to K/V (norm -> k/v proj -> k_norm -> RoPE), or compute the query of the
  current step (for attention-scored eviction).
(The observation hooks that feed kvbound caches live in :mod:`kvbound.cache.hooks`.)
"""

from __future__ import annotations

import inspect
import sys
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .errors import KVBoundError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

# model_type -> families whose decoder layers look like Llama's (input_layernorm, self_attn with
# q/k/v_proj, optional q_norm/k_norm, rotary position embeddings computed by the base model).
SUPPORTED_FAMILIES = ("gemma3_text", "llama", "mistral", "qwen2", "qwen3")


# Families whose modeling code slides every layer when ``config.sliding_window`` is set (one mask
# function for the whole model) and ignores any ``layer_types`` (transformers 5.23).
UNIFORM_SLIDING = ("mistral", "mixtral", "phi3", "phimoe", "qwen3_moe", "starcoder2")


def attention_types(config) -> list[str]:
    """Each layer's attention type (``"sliding_attention"`` / ``"full_attention"``) exactly as
    transformers' modeling code picks it (5.23):

    * Mistral-style families (:data:`UNIFORM_SLIDING`) and configs without ``layer_types``: every
      layer slides iff ``sliding_window`` is set;
    * otherwise ``layer_types``, which the config itself derives when not given (Qwen2/Qwen3:
      ``use_sliding_window`` and layers ``>= max_window_layers``; Gemma 3: every 6th layer full).

    A sliding type without a window (Qwen2 with ``use_sliding_window=False``) attends fully.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if config.model_type in UNIFORM_SLIDING or types is None:
        types = ["sliding_attention" if window is not None else "full_attention"] * n
    return ["sliding_attention" if t == "sliding_attention" and window is not None else "full_attention"
            for t in types]


def base_model(model: "PreTrainedModel") -> nn.Module:
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise KVBoundError(
            f"{type(model).__name__} ({model.config.model_type}) cannot be driven layer by layer; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    return base


def check_supported(model: "PreTrainedModel") -> None:
    """Raise a clear error if ``model``'s layers cannot be driven by :class:`LayerDriver`."""
    model_type = model.config.get_text_config(decoder=True).model_type
    if model_type not in SUPPORTED_FAMILIES:
        raise KVBoundError(
            f"model family {model_type!r} is not supported for K/V recomputation; "
            f"supported families: {', '.join(SUPPORTED_FAMILIES)}"
        )
    base_model(model)


class _SpanLayer(DynamicLayer):
    """A full-attention layer of :meth:`LayerDriver.run_layer`'s throw-away cache: the span's K/V
    are written into buffers sized for the whole span (no re-concatenation per chunk, which would
    hold the old and the grown copy at once); attention gets views of the rows filled so far."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens, self.filled = tokens, 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._k = key_states.new_empty((*key_states.shape[:-2], self.tokens, key_states.shape[-1]))
            self._v = value_states.new_empty((*value_states.shape[:-2], self.tokens, value_states.shape[-1]))
        end = self.filled + key_states.shape[-2]
        self._k[..., self.filled:end, :] = key_states
        self._v[..., self.filled:end, :] = value_states
        self.filled = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.filled


class LayerDriver:
    """Runs pieces of ``model`` on a span of tokens, layer by layer."""

    def __init__(self, model: "PreTrainedModel") -> None:
        check_supported(model)
        self.model = model
        self.base = base_model(model)
        self.config = model.config.get_text_config(decoder=True)
        self.layer_types = attention_types(self.config)
        self._rope_takes_type = "layer_type" in inspect.signature(self.base.rotary_emb.forward).parameters
        attn0 = self.base.layers[0].self_attn
        self._apply_rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb

    # -- pieces ---------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The layer-0 residual: the model's own (possibly scaled) token embedding."""
        return self.base.embed_tokens(input_ids)

    def position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int):
        if self._rope_takes_type:
            return self.base.rotary_emb(hidden, position_ids, self.layer_types[layer_idx])
        return self.base.rotary_emb(hidden, position_ids)

    def _mask(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int, past: DynamicCache):
        make = create_sliding_window_causal_mask if self.layer_types[layer_idx] == "sliding_attention" else create_causal_mask
        return make(config=self.config, inputs_embeds=hidden, attention_mask=None, past_key_values=past,
                    position_ids=position_ids, layer_idx=layer_idx)

    # -- services ---------------------------------------------------------------------
    @torch.no_grad()
    def run_layer(self, layer_idx: int, hidden: torch.Tensor, position_ids: torch.Tensor,
                  chunk: int | None = None, in_place: bool = False):
        """Run decoder layer ``layer_idx`` causally over a span that starts at token 0.

        The span runs ``chunk`` rows per call of the layer (``None``: one call), each chunk
        attending to the K/V of the rows before it, exactly as the model's own chunked prefill
        with a ``DynamicCache``: the same rows grouped the same way give bit-identical K/V, and
        attention, MLP and mask transients are bounded by the chunk instead of the span.
        ``in_place``: write each chunk's output over its input rows (the caller's residual buffer
        is then the output; the input rows are not needed once their chunk has run).

        Returns ``(next_hidden, keys, values)``: the residual entering the next layer and this
        layer's K/V (post k_norm and RoPE, exactly as attention caches them) for the *last*
        ``keys.shape[-2]`` tokens of the span -- all of them, or on a sliding-window layer the
        ``window - 1`` that later tokens can still see.
        """
        capture = DynamicCache(config=self.config)  # throw-away: the span's K/V, as the model caches them
        layer = self.base.layers[layer_idx]
        n = hidden.shape[1]
        if type(capture.layers[layer_idx]) is DynamicLayer:  # full attention: fill one span-sized buffer
            capture.layers[layer_idx] = _SpanLayer(n)
        step = n if chunk is None else max(1, chunk)
        out = hidden if in_place else torch.empty_like(hidden)
        for a in range(0, n, step):
            h, pos = hidden[:, a:a + step], position_ids[:, a:a + step]
            o = layer(
                h,
                attention_mask=self._mask(h, pos, layer_idx, capture),
                position_ids=pos,
                past_key_values=capture,
                use_cache=True,
                position_embeddings=self.position_embeddings(h, pos, layer_idx),
            )
            out[:, a:a + step] = o[0] if isinstance(o, tuple) else o
        cl = capture.layers[layer_idx]
        return out, cl.keys, cl.values

    @torch.no_grad()
    def project_kv(self, layer_idx: int, residual: torch.Tensor, position_ids: torch.Tensor,
                   chunk: int | None = None):
        """K/V of layer ``layer_idx`` from the pre-norm residual entering it.

        input_layernorm -> k_proj/v_proj -> k_norm (if any) -> RoPE at ``position_ids``; ``chunk``
        rows at a time into the output (``None``: all at once), which bounds the norm, projection
        and RoPE temporaries by the chunk.
        """
        n = residual.shape[-2]
        if chunk is None or n <= chunk:
            return self._project_kv(layer_idx, residual, position_ids)
        keys = values = None
        for a in range(0, n, chunk):
            k, v = self._project_kv(layer_idx, residual[:, a:a + chunk], position_ids[:, a:a + chunk])
            if keys is None:
                keys, values = k.new_empty((*k.shape[:2], n, k.shape[-1])), v.new_empty((*v.shape[:2], n, v.shape[-1]))
            keys[..., a:a + chunk, :], values[..., a:a + chunk, :] = k, v
        return keys, values

    def _project_kv(self, layer_idx: int, residual: torch.Tensor, position_ids: torch.Tensor):
        layer = self.base.layers[layer_idx]
        attn = layer.self_attn
        x = layer.input_layernorm(residual)
        shape = (*x.shape[:-1], -1, attn.head_dim)
        k = attn.k_proj(x).view(shape)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        k_norm = getattr(attn, "k_norm", None)
        if k_norm is not None:
            k = k_norm(k)
        k = k.transpose(1, 2)
        cos, sin = self.position_embeddings(residual, position_ids, layer_idx)
        k, _ = self._apply_rope(k, k, cos, sin)
        return k, v

    @torch.no_grad()
    def query(self, layer_idx: int, normed: torch.Tensor, position_embeddings) -> torch.Tensor:
        """Post-RoPE query states ``[B, heads, T, head_dim]`` for the attention input ``normed``."""
        return self.rope(self.prerope_query(layer_idx, normed), *position_embeddings)

    @torch.no_grad()
    def prerope_query(self, layer_idx: int, normed: torch.Tensor) -> torch.Tensor:
        """Query states before RoPE ``[B, heads, T, head_dim]`` (q_proj, then q_norm where the family has one)."""
        attn = self.base.layers[layer_idx].self_attn
        shape = (*normed.shape[:-1], -1, attn.head_dim)
        q = attn.q_proj(normed).view(shape)
        q_norm = getattr(attn, "q_norm", None)
        if q_norm is not None:
            q = q_norm(q)
        return q.transpose(1, 2)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, H, T, D]`` rotated by the model's own ``apply_rotary_pos_emb`` (``cos``/``sin`` ``[B, T, D]``)."""
        return self._apply_rope(x, x, cos, sin)[0]

    def attention_scaling(self, layer_idx: int) -> float:
        return float(self.base.layers[layer_idx].self_attn.scaling)

    def kv_groups(self) -> int:
        return self.config.num_attention_heads // self.config.num_key_value_heads
