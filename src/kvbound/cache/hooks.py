"""Stateless forward pre-hooks that tell a kvbound cache what it cannot see through ``Cache.update``:
the step's input ids, each layer's residual input, each attention module's normed input, and the
end of the base model's forward pass (:meth:`~kvbound.cache.base.KVBoundCache.observe_output`).

Around each attention module a pre-hook pushes the call's cache on :mod:`kvbound.attention`'s
context stack (when the module runs kvbound's tiered attention) and a forward hook pops it, so a
layer's ``update`` and the attention function find the cache of *this* call -- also when a cache
rebuilds K/V by running other layers with a throw-away cache in the middle of the step.

The hooks hold no state: they look up the cache in the call's ``past_key_values`` and do
nothing for any other cache, so a model with hooks attached runs unchanged without kvbound.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from torch import nn

from .. import attention
from ..errors import KVBoundError
from ..recompute import base_model, check_supported
from .base import KVBoundCache

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel


def _cache_of(kwargs: dict):
    """The call's kvbound cache, or a batch of them (:class:`kvbound.batching.CacheBatch`: ``attend_rows``)."""
    cache = kwargs.get("past_key_values")
    return cache if isinstance(cache, KVBoundCache) or hasattr(cache, "attend_rows") else None


def _on_base(module, args, kwargs):
    attention.reset()  # a whole forward pass starts: nothing left over from an interrupted one
    cache = _cache_of(kwargs)
    if cache is not None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache.observe_input_ids(ids)


def _after_base(module, args, kwargs, output):
    cache = _cache_of(kwargs)
    if cache is not None:
        cache.observe_output()


def _on_module(layer_idx: int, observe: str):
    """Pre-hook that hands module ``layer_idx``'s first input to ``cache.<observe>``."""

    def hook(module, args, kwargs):
        cache = _cache_of(kwargs)
        if cache is not None:
            hidden = args[0] if args else kwargs["hidden_states"]
            getattr(cache, observe)(layer_idx, hidden, kwargs)

    return hook


def _enter_attention(module, args, kwargs):
    cache = _cache_of(kwargs)
    attention.push(cache if cache is not None and attention.is_tiered(module) else None)


def _leave_attention(module, *_):
    attention.pop()


_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, list[Any]]" = weakref.WeakKeyDictionary()


def attach(model: "PreTrainedModel") -> None:
    """Register kvbound's observation hooks on ``model`` once (idempotent).

    The hooks are stateless dispatchers: a forward pass without a kvbound cache is unaffected.
    """
    if model in _ATTACHED:
        return
    base = base_model(model)
    handles = [base.register_forward_pre_hook(_on_base, with_kwargs=True),
               base.register_forward_hook(_after_base, with_kwargs=True)]
    for i, layer in enumerate(base.layers):
        handles.append(layer.register_forward_pre_hook(_on_module(i, "observe_layer_input"), with_kwargs=True))
        attn = layer.self_attn
        handles.append(attn.register_forward_pre_hook(_enter_attention, with_kwargs=True))  # first: popped even
        handles.append(attn.register_forward_pre_hook(_on_module(i, "observe_attention_input"), with_kwargs=True))
        handles.append(attn.register_forward_hook(_leave_attention, with_kwargs=True, always_call=True))
    _ATTACHED[model] = handles


def use_tiered_attention(model: "PreTrainedModel") -> bool:
    """Attach the hooks and run ``model``'s attention through :mod:`kvbound.attention` (if it uses
    sdpa). Returns ``False`` for families whose layers cannot be hooked: their caches then
    concatenate tiers for the model's own attention."""
    try:
        check_supported(model)
    except KVBoundError:
        return False
    attach(model)
    return attention.enable(model)


def detach(model: "PreTrainedModel") -> None:
    """Remove the hooks :func:`attach` registered (for tidy tests; never required)."""
    for h in _ATTACHED.pop(model, []):
        h.remove()
