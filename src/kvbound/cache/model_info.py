"""What kvbound needs to know about a model's layers: attention type per layer, K/V sizes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..recompute import attention_types

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


def text_config(model: "PreTrainedModel"):
    return model.config.get_text_config(decoder=True)


def layer_windows(model: "PreTrainedModel") -> list[int | None]:
    """Per layer: the sliding window for sliding-attention layers, else ``None`` (attention types
    derived as transformers does, :func:`kvbound.recompute.attention_types`)."""
    cfg = text_config(model)
    return [cfg.sliding_window if t == "sliding_attention" else None for t in attention_types(cfg)]


def first_full_layer(model: "PreTrainedModel") -> int | None:
    """Index of the first full-attention layer (``None`` if every layer is sliding)."""
    return next((i for i, w in enumerate(layer_windows(model)) if w is None), None)


def head_dim(model: "PreTrainedModel") -> int:
    cfg = text_config(model)
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def kv_bytes_per_token(model: "PreTrainedModel") -> int:
    """Analytic K+V bytes one token costs across all layers (batch 1, full attention)."""
    cfg = text_config(model)
    d = head_dim(model)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    itemsize = torch.empty((), dtype=model.dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * d * itemsize
