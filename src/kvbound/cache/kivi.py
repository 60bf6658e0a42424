"""``kivi``: every token kept, quantized -- KIVI (Liu et al. 2024), lossy.

Keys are quantized per channel over blocks of ``group`` tokens, values per token over groups of
``group`` channels (:mod:`kvbound.cache.codec`), to ``bits`` 2, 4 or 8 -- KIVI's grouping (its
reference code transposes the keys and groups along tokens). Default ``group``: 32 at 4 bits (KIVI's),
16 at 2 bits, the whole head at 8. Values' groups take the clipping range of least squared error
(option ``clip``, default on; keys keep min-max): at 2 bits on SmolLM2 this halves the values' error
and, with group 16, brings perplexity from +16.8% (KIVI's group 32, min-max) to +4.7% of ``full``'s.

The newest tokens stay in full precision: between ``residual`` and ``residual + group - 1`` of them (KIVI's residual: keys
can only be quantized per channel once a whole block of ``group`` tokens has arrived). Each step
the quantized part is dequantized into the K/V handed to attention (a transient buffer, freed
after the layer), as in KIVI's reference implementation and transformers' ``QuantizedCache``.

kivi needs no budget: it never drops a token; ``residual`` is the full-precision window.

Gemma 3 sliding layers keep only what the window can still see: quantized blocks and residual
tokens older than ``window - 1`` tokens are dropped (whole blocks), so the past stays a
contiguous suffix and masks stay exact.

Memory report: ``hot_kv`` is the full-precision residual; ``quantized`` the packed codes plus
their float16 scales and zero points, counted exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import KVBoundError
from .base import KVBoundCache, PolicyLayer, nbytes
from .codec import Codec, Packed, cat, int_codec
from .hot_window import HotWindowLayer
from .model_info import head_dim, layer_windows
from .registry import register


@dataclass
class KiviOptions:
    bits: int = 4  # 2, 4 or 8
    group: int | None = None  # channels (values) / tokens (keys) per scale; default by bits (codec.default_group)
    residual: int = 128  # newest tokens kept in full precision
    outliers: int = 0  # values: per token, channels of largest magnitude kept in float16 (keys are per channel)
    clip: bool = True  # values: per group, the clipping range of least squared error (keys keep min-max)


def refuse_budget(policy: str, budget: int | None, window: str) -> None:
    """Quantizing policies keep every token: a budget would promise what they do not do."""
    if budget is not None:
        raise KVBoundError(f"{policy} keeps every token (quantized) and takes no budget; {window}, "
                           "e.g. --option residual=64")


class KiviLayer(PolicyLayer, DynamicLayer):
    """Quantized K/V of older tokens + full-precision ``keys``/``values`` of the newest ones."""

    def __init__(self, cache: "KiviCache", layer_idx: int, sliding_window: int | None) -> None:
        DynamicLayer.__init__(self)
        self._init_policy(cache, layer_idx, sliding_window)
        self.codec: Codec = cache.codec
        self.vcodec: Codec = replace(cache.codec, clip=cache.options.clip)
        self.residual = cache.options.residual
        self.qk: Packed | None = None
        self.qv: Packed | None = None

    lazy_initialization = HotWindowLayer.lazy_initialization  # empty [B, H, 0, D] K/V

    def quantized_tokens(self) -> int:
        return 0 if self.qk is None else self.qk.tokens

    def past_visible(self) -> int:
        return self.quantized_tokens() + (0 if self.keys is None else self.keys.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        nq, new = self.quantized_tokens(), key_states.shape[-2]
        b, h, _, d = key_states.shape
        total = self.past_visible() + new
        keys = key_states.new_empty((b, h, total, d))
        values = value_states.new_empty((b, h, total, d))
        if nq:
            self.qk.decode(keys.dtype, out=keys[..., :nq, :])
            self.qv.decode(values.dtype, out=values[..., :nq, :])
        keys[..., nq:total - new, :].copy_(self.keys)
        keys[..., total - new:, :].copy_(key_states)
        values[..., nq:total - new, :].copy_(self.values)
        values[..., total - new:, :].copy_(value_states)
        self.cache.note_transient(nbytes(keys, values))
        self.seen += new
        self._store(keys[..., nq:, :], values[..., nq:, :])
        self.cache.account(self.layer_idx)
        return keys, values

    def _store(self, res_k: torch.Tensor, res_v: torch.Tensor) -> None:
        """Quantize whole ``group``-token blocks beyond ``residual``; keep the rest in full precision."""
        g = self.codec.group
        over = res_k.shape[-2] - self.residual
        m = (over // g) * g if over >= g else 0
        if m:
            qk, qv = self.codec.encode(res_k[..., :m, :], "channel"), self.vcodec.encode(res_v[..., :m, :], "token")
            self.qk = qk if self.qk is None else cat([self.qk, qk])
            self.qv = qv if self.qv is None else cat([self.qv, qv])
        self.keys, self.values = res_k[..., m:, :].clone(), res_v[..., m:, :].clone()
        if self.sliding_window is not None:
            self._drop_unseeable()

    def _drop_unseeable(self) -> None:
        """Sliding layers: forget whole quantized blocks (then residual tokens) the window no longer sees."""
        old = self.past_visible() - (self.sliding_window - 1)  # held tokens the next step cannot see
        if old <= 0:
            return
        nq, g = self.quantized_tokens(), self.codec.group
        if nq:
            drop = min(nq, (old // g) * g)
            if drop == nq:
                self.qk = self.qv = None
            elif drop:
                self.qk, self.qv = self.qk.drop_front(drop), self.qv.drop_front(drop)
            old -= drop
            if self.qk is not None:
                return  # the residual follows a kept block: nothing older to drop there
        if old > 0:
            self.keys, self.values = self.keys[..., old:, :].clone(), self.values[..., old:, :].clone()

    def tiers(self) -> dict[str, int]:
        q = 0 if self.qk is None else self.qk.nbytes() + self.qv.nbytes()
        return {"hot_kv": nbytes(self.keys, self.values), "quantized": q}

    # -- beam search / reset: the quantized tensors follow the batch too --------------------
    def map_batch(self, fn) -> None:
        if self.qk is not None:
            self.qk, self.qv = self.qk.index_batch(fn), self.qv.index_batch(fn)
        super().map_batch(fn)

    def reset(self) -> None:
        super().reset()
        self.qk = self.qv = None


@register("kivi", "lossy: KIVI (Liu et al. 2024) -- every token kept, K per channel / V per token at `bits` "
          "2/4/8, newest `residual` tokens (option, default 128) in full precision; takes no budget",
          exact=False, needs_budget=False, options=KiviOptions, beams=True)
class KiviCache(KVBoundCache):
    def __init__(self, model, budget: int | None = None, **options: Any) -> None:
        opts = self.options = self.parse_options(options)
        refuse_budget("kivi", budget, f"its full-precision window is the option residual (default {KiviOptions.residual})")
        if isinstance(opts.residual, bool) or not isinstance(opts.residual, int) or opts.residual < 0:
            raise KVBoundError(f"kivi option residual must be a whole number >= 0, got {opts.residual!r}")
        if not isinstance(opts.clip, bool):
            raise KVBoundError(f"kivi option clip must be true or false, got {opts.clip!r}")
        self.codec = int_codec(opts.bits, head_dim(model), opts.group, "kivi", opts.outliers)
        layers = [KiviLayer(self, i, w) for i, w in enumerate(layer_windows(model))]
        super().__init__(model, budget, layers)
