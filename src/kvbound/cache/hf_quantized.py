"""``hf-quantized``: transformers' own ``QuantizedCache`` run through kvbound's CLI and bench (lossy).

A thin wrapper so the peer users would try first is measured in the same run as ``kivi``: the
layers are transformers' ``QuantoQuantizedLayer`` / ``HQQQuantizedLayer`` / ``Fp8QuantizedLayer``
unchanged, plus kvbound's memory accounting (``hot_kv`` = their full-precision residual,
``quantized`` = every tensor inside their quantized states, counted exactly).

Backends (option ``backend``): ``quanto`` (optimum-quanto, bits 2/4), ``hqq`` (bits 1/2/3/4/8) and
``fp8`` (per-tensor float8, no bits/group/residual). quanto and hqq come with the ``quant`` extra:
``pip install 'kvbound[quant]'``. transformers' ``QuantizedCache`` serves only models whose layers
all use full attention: Gemma 3 (sliding layers) is refused -- use ``kivi`` there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Fp8QuantizedLayer, HQQQuantizedLayer, QuantoQuantizedLayer
from transformers.utils import is_hqq_available, is_optimum_quanto_available

from ..errors import KVBoundError
from .base import KVBoundCache, PolicyLayer, nbytes
from .codec import check_group
from .kivi import refuse_budget
from .model_info import head_dim, layer_windows
from .registry import register

EXTRA = "pip install 'kvbound[quant]'"


def held_bytes(obj: Any) -> int:
    """Bytes of every tensor inside ``obj`` (tensor subclasses such as quanto's are unflattened)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_bytes(getattr(obj, n)) for n in names)
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(held_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(held_bytes(o) for o in obj.values())
    return 0


class _Accounted:
    """kvbound's bookkeeping around one of transformers' quantized layers."""

    cache: "HfQuantizedCache"
    layer_idx: int

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        self.cache.note_transient(nbytes(keys, values))
        self.cache.account(self.layer_idx)
        return keys, values

    def tiers(self) -> dict[str, int]:
        hot = nbytes(self.keys, self.values) if self.keys is not None and self.keys.dim() == 4 else 0
        return {"hot_kv": hot, "quantized": held_bytes((self._quantized_keys, self._quantized_values))}

    truncate = PolicyLayer.truncate  # transformers' quantized layers cannot roll back


class QuantoLayer(_Accounted, QuantoQuantizedLayer):
    pass


class HQQLayer(_Accounted, HQQQuantizedLayer):
    pass


class Fp8Layer(_Accounted, Fp8QuantizedLayer):
    pass


# backend -> (layer class, bits it takes, whether its library is installed)
BACKENDS = {
    "quanto": (QuantoLayer, (2, 4), is_optimum_quanto_available),
    "hqq": (HQQLayer, (1, 2, 3, 4, 8), is_hqq_available),
    "fp8": (Fp8Layer, (), lambda: True),
}


@dataclass
class HfQuantizedOptions:
    backend: str = "quanto"  # quanto, hqq or fp8
    bits: int | None = None  # quanto 2/4, hqq 1/2/3/4/8 (default 4); fp8 takes none
    group: int | None = None  # transformers' q_group_size (default 64, or the largest divisor of head_dim below)
    residual: int | None = None  # transformers' residual_length (default 128)


@register("hf-quantized", "lossy: transformers' own QuantizedCache (option backend quanto/hqq/fp8, bits), "
          "the peer of kivi; full-attention models only; takes no budget", exact=False, needs_budget=False,
          options=HfQuantizedOptions)
class HfQuantizedCache(KVBoundCache):
    def __init__(self, model, budget: int | None = None, **options: Any) -> None:
        opts = self.options = self.parse_options(options)
        refuse_budget("hf-quantized", budget, "its full-precision window is the option residual (default 128)")
        if opts.backend not in BACKENDS:
            raise KVBoundError(f"hf-quantized option backend must be one of {', '.join(BACKENDS)}, got {opts.backend!r}")
        layer_cls, bits_ok, available = BACKENDS[opts.backend]
        if any(w is not None for w in layer_windows(model)):
            raise KVBoundError(f"hf-quantized cannot serve {type(model).__name__}: transformers' QuantizedCache refuses "
                               "models with sliding-window layers; use --policy kivi")
        kwargs = {"nbits": opts.bits, "q_group_size": opts.group, "residual_length": opts.residual}
        if opts.backend == "fp8":
            given = [k for k, v in (("bits", opts.bits), ("group", opts.group), ("residual", opts.residual)) if v is not None]
            if given:
                raise KVBoundError(f"hf-quantized backend fp8 quantizes per tensor and takes no {', '.join(given)}")
            kwargs = {}
        else:
            if opts.bits is not None and (isinstance(opts.bits, bool) or opts.bits not in bits_ok):
                raise KVBoundError(f"hf-quantized backend {opts.backend} takes bits {'/'.join(map(str, bits_ok))}, "
                                   f"got {opts.bits!r}")
            # quanto groups the flattened tensor: a divisor of head_dim always fits (transformers' 64 may not)
            d = head_dim(model)
            kwargs["q_group_size"] = math.gcd(64, d) if opts.group is None else check_group(opts.group, d, "hf-quantized")
            kwargs = {k: v for k, v in kwargs.items() if v is not None}
        if not available():
            raise KVBoundError(f"hf-quantized backend {opts.backend} needs its library: {EXTRA}")
        layers = []
        for i in range(len(layer_windows(model))):
            try:
                layer = layer_cls(**kwargs)
            except (ValueError, ImportError) as exc:  # transformers' own checks (group, versions)
                raise KVBoundError(f"hf-quantized ({opts.backend}): {str(exc).splitlines()[0]}") from None
            layer.cache, layer.layer_idx = self, i
            layers.append(layer)
        super().__init__(model, budget, layers)
