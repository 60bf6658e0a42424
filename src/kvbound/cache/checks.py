"""Input checks shared by policies: padding, positions and option values (one clear error line each)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..errors import KVBoundError

if TYPE_CHECKING:  # pragma: no cover
    from .base import KVBoundCache


def check_int(value: Any, name: str, policy: str, minimum: int) -> None:
    """Options must be whole numbers >= ``minimum`` (one clear error line otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise KVBoundError(f"{policy} option {name} must be a whole number >= {minimum}, got {value!r}")


def refuse_padding(mask: torch.Tensor | None, policy: str) -> None:
    """Raise if the 4-D attention mask of a full-attention layer hides any key from the step's
    last query: without padding the last query sees every key returned (past and new)."""
    if mask is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return
    last = mask[..., -1, :]
    visible = last if last.dtype == torch.bool else last == 0
    if not bool(visible.all()):
        raise KVBoundError(
            f"policy {policy!r} does not support padded batches (attention_mask has zeros); "
            "run sequences of equal length or one at a time"
        )


def check_unpadded(cache: "KVBoundCache", hidden: torch.Tensor, kwargs: dict) -> None:
    """Refuse a forward pass that is padded or whose positions are not ``seen .. seen+T``.

    Recomputing policies rebuild K/V at positions ``0 .. n-1`` with a plain causal mask;
    padded batches (or custom ``position_ids``) would be rebuilt wrongly, so they get a clear
    error. Call it with the inputs of the first full-attention layer.
    """
    if cache.layers[cache.check_layer].sliding_window is None:  # a sliding mask hides old keys anyway
        refuse_padding(kwargs.get("attention_mask"), cache.policy_name)
    pos = kwargs.get("position_ids")
    if pos is None:
        return
    seen, steps = cache.layers[cache.check_layer].seen, hidden.shape[-2]
    expected = torch.arange(seen, seen + steps, device=pos.device)
    if pos.shape[-1] != steps or not bool((pos == expected).all()):
        raise KVBoundError(
            f"policy {cache.policy_name!r} needs unpadded input at positions {seen}..{seen + steps - 1}; "
            "padded batches and custom position_ids are not supported (run each sequence on its own cache)"
        )
