"""Cache policies. Every module in this package registers its policy by name on import."""

from __future__ import annotations

import importlib
import pkgutil
from typing import TYPE_CHECKING, Any

from ..errors import KVBoundError
from .base import KVBoundCache, PolicyLayer, nbytes
from .registry import exact_policies, get_policy, register, registered

# Neutral modules that hold shared pieces (no policy registers there); every other module is a policy.
_SHARED = {"allocation", "base", "channels", "checks", "codec", "evicting", "hooks", "hot_window", "model_info", "recall", "registry",
           "retrieval_heads"}

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in _SHARED:
        importlib.import_module(f"{__name__}.{_mod.name}")


def policies() -> dict[str, str]:
    """Registered policy names with one-line descriptions."""
    return {name: spec.description for name, spec in registered().items()}


def make_cache(model: "PreTrainedModel", policy: str = "full", budget: int | None = None, **options: Any) -> KVBoundCache:
    """Build a cache for ``model`` that keeps at most ``budget`` tokens' K/V hot per layer.

    The returned object works as ``model.generate(past_key_values=cache)`` and can be
    reused across several ``generate`` calls (multi-turn).
    """
    spec = get_policy(policy)
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise KVBoundError(f"budget must be a whole number of tokens, got {budget!r}")
        if budget < 1:
            raise KVBoundError(f"budget must be >= 1 token, got {budget}")
    elif spec.needs_budget:
        raise KVBoundError(f"policy {policy!r} needs a budget (tokens kept per layer), e.g. budget=64")
    if not getattr(model.config, "is_decoder", True) and not getattr(model, "can_generate", lambda: False)():
        raise KVBoundError(f"model {type(model).__name__} is not a causal language model")
    return spec.build(model, budget, **options)


__all__ = ["KVBoundCache", "PolicyLayer", "exact_policies", "make_cache", "nbytes", "policies", "register", "registered"]
