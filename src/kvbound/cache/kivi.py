"""``kivi``: every token kept, quantized -- KIVI (Liu et al. 2024), lossy.

Keys are quantized per channel over blocks of ``group`` tokens, values per token over groups of
``group`` channels (:mod:`kvbound.cache.codec`), to ``bits`` 2, 4 or 8 -- KIVI's grouping (its
reference code transposes the keys and groups along tokens). Default ``group``: 32 at 4 bits (KIVI's),
16 at 2 bits, the whole head at 8. Values' groups take the clipping range of least squared error
(option ``clip``, default on; keys keep min-max): at 2 bits on SmolLM2 this halves the values' error
and, with group 16, brings perplexity from +16.8% (KIVI's group 32, min-max) to +4.7% of ``full``'s.

The newest tokens stay in full precision: between ``residual`` and ``residual + group - 1`` of them (KIVI's residual: keys
can only be quantized per channel once a whole block of ``group`` tokens has arrived). Each step
the quantized part is read by kvbound's C kernel (:mod:`kvbound.kernels`: codes dequantized in
registers inside an online softmax, merged with the full-precision part by kvbound's tiered
attention), so a decoding step writes no float copy of it. Where the kernel does not apply (option
``kernel=False``, no C compiler, another attention implementation, bf16/fp16, a GPU, outlier channels,
value groups narrower than 8 channels, prefill chunks, partly masked blocks) the quantized part is
dequantized into the K/V handed to attention (a transient buffer, freed after the layer), as in
KIVI's reference implementation and transformers' ``QuantizedCache``.

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

from .. import attention, kernels
from ..errors import KVBoundError
from .base import KVBoundCache, PolicyLayer, kv_bytes, nbytes
from .codec import Codec, Packed, cat, int_codec
from .hooks import use_tiered_attention
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
    kernel: bool = True  # decoding steps read the quantized part with kvbound's C kernel (kvbound.kernels)


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
        self.pending_step: attention.TierStep | None = None  # the quantized part, for tiered attention

    lazy_initialization = HotWindowLayer.lazy_initialization  # empty [B, H, 0, D] K/V
    attends_tiered = HotWindowLayer.attends_tiered  # this cache's tiered attention runs this step

    def quantized_tokens(self) -> int:
        return 0 if self.qk is None else self.qk.tokens

    def past_visible(self) -> int:
        return self.quantized_tokens() + (0 if self.keys is None else self.keys.shape[-2])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending_step = None  # a hand-over an interrupted pass never used
        nq, new = self.quantized_tokens(), key_states.shape[-2]
        if nq and self._kernel_applies(key_states):
            return self._update_tiered(key_states, value_states, nq)
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

    def _kernel_applies(self, like: torch.Tensor) -> bool:
        return (self.cache.options.kernel and not self.codec.outliers and self.codec.group % 8 == 0
                and self.attends_tiered(like) and kernels.applies(like, self.codec.bits))

    def _update_tiered(self, key_states: torch.Tensor, value_states: torch.Tensor, nq: int):
        """Attention reads the quantized part as one block (the C kernel; decoded only where the
        kernel does not pay or a mask hides part of it) before the full-precision + new K/V returned."""
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        qk, qv, g = self.qk, self.qv, self.codec.group  # _store below replaces, never changes, them
        coded_k = kernels.Coded(qk.data, qk.scale, qk.zero, g, per_channel=True)
        coded_v, bits = kernels.Coded(qv.data, qv.scale, qv.zero, g), self.codec.bits

        def attend(query, scaling, softcap):
            return kernels.attend_if_pays(query, coded_k, coded_v, bits, scaling, softcap)

        def load():
            return qk.decode(keys.dtype), qv.decode(values.dtype)

        decoded = kv_bytes(keys, nq) if kernels.may_fall_back(key_states, self.sliding_window) else 0
        self.cache.note_transient(nbytes(keys, values) + decoded)
        self.seen += key_states.shape[-2]
        self._store(keys, values)
        self.cache.account(self.layer_idx)
        self.pending_step = attention.TierStep(keys, [attention.LazyBlock(nq, load, attend)])
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
        self.pending_step = None


@register("kivi", "lossy: KIVI (Liu et al. 2024) -- every token kept, K per channel / V per token at `bits` "
          "2/4/8, newest `residual` tokens (option, default 128) in full precision; takes no budget",
          exact=False, needs_budget=False, options=KiviOptions, beams=True,
          paper="Liu et al. 2024, https://arxiv.org/abs/2402.02750")
class KiviCache(KVBoundCache):
    def __init__(self, model, budget: int | None = None, **options: Any) -> None:
        opts = self.options = self.parse_options(options)
        refuse_budget("kivi", budget, f"its full-precision window is the option residual (default {KiviOptions.residual})")
        if isinstance(opts.residual, bool) or not isinstance(opts.residual, int) or opts.residual < 0:
            raise KVBoundError(f"kivi option residual must be a whole number >= 0, got {opts.residual!r}")
        for name in ("clip", "kernel"):
            if not isinstance(getattr(opts, name), bool):
                raise KVBoundError(f"kivi option {name} must be true or false, got {getattr(opts, name)!r}")
        self.codec = int_codec(opts.bits, head_dim(model), opts.group, "kivi", opts.outliers)
        layers = [KiviLayer(self, i, w) for i, w in enumerate(layer_windows(model))]
        super().__init__(model, budget, layers)
        if opts.kernel:
            use_tiered_attention(model)
