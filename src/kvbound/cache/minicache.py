"""``minicache``: MiniCache (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth Dimension for
Large Language Models", https://arxiv.org/abs/2405.14366) -- adjacent deep layers share one direction
per token.

Rule
----
From layer ``start`` (default ``num_layers // 2``) on, the layers go in pairs ``(l-1, l)`` =
``(start, start+1), (start+2, start+3), ...`` (a last odd layer, and any pair with a sliding-window
layer, stays as ``full`` keeps it). For each token and KV head, separately for K and V, with
``x_a`` the vector of layer ``l-1`` and ``x_b`` that of layer ``l``::

    Omega = arccos(cos(x_a, x_b))
    e     = [sin((1-t) Omega) x_a/|x_a| + sin(t Omega) x_b/|x_b|] / sin(Omega)      (SLERP, t = 0.6)

and the pair stores ``e`` once plus each layer's norm ``|x_a|``, ``|x_b|``; layer ``l-1`` reads back
``e |x_a|``, layer ``l`` reads ``e |x_b|``. Near-parallel vectors (``sin Omega`` below 1e-6) use the
linear interpolation the SLERP tends to. **Retention**: the tokens whose two layers differ most
(angular distance ``Omega / pi``, averaged over the KV heads) are not merged: the ``retain`` fraction
(default 0.05, rounded, per merged chunk and sequence) of the chunk's tokens keeps both layers' exact
vectors (and no ``e``), with their positions.

Hot window and chunks
---------------------
New tokens stay exact in a hot window. When a pair's hot window holds more than ``2 * window``
tokens, all but the newest ``window`` are merged (a prompt in one pass is merged at once, minus the
window; during decoding ``window`` or more tokens at a time). The merge runs in the second layer's
``update``, after the first layer stored the step's tokens; attention at that step still read the
exact K/V. Each step a merged layer returns its merged tokens restored (in position order, so masks
and padding stay where they were) followed by its hot window.

Bytes
-----
Everything held is counted from the tensors: per layer ``hot_kv`` = its hot window, its norms and its
retained vectors, plus the shared directions on the pair's second layer (so the sum over layers
is what the cache holds); ``retained_positions`` = the int64 positions of the retained tokens.
:meth:`MiniCacheCache.memory_report` adds ``bytes_by_layer`` (each layer's share by component).
With ``t = 0.6`` and 5% retention a merged pair holds about 0.54 of its two layers' K/V; on a
30-layer model with ``start`` = 15 that is about 0.79 of ``full`` once the context is well beyond
the window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from ..errors import KVBoundError
from .base import KVBoundCache, PolicyLayer, gather_tokens, nbytes
from .checks import check_int
from .full import FullLayer, FullSlidingLayer
from .model_info import layer_windows
from .registry import register

_PARALLEL = 1e-6  # sin(Omega) below this: the SLERP is its linear limit


@dataclass
class MiniCacheOptions:
    start: int | None = None  # first merged layer (pairs start, start+1), ...; default num_layers // 2
    window: int = 32  # newest tokens kept unmerged (up to 2 * window between merges)
    t: float = 0.6  # SLERP interpolation: 0 = layer l-1's direction, 1 = layer l's
    retain: float = 0.05  # fraction of each merged chunk's tokens kept unmerged (largest angular distance)


# --------------------------------------------------------------------------- the formulas


def slerp_merge(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, ...]:
    """MiniCache's merge of two layers' vectors ``a`` (layer l-1), ``b`` (layer l), ``[..., D]``.

    Returns ``(e, |a|, |b|, distance)``: the SLERP direction ``e`` (unit, ``[..., D]``, in ``a``'s dtype),
    the norms ``[...]`` and the angular distance ``Omega / pi`` ``[...]`` (float32)."""
    af, bf = a.float(), b.float()
    na, nb = af.norm(dim=-1), bf.norm(dim=-1)
    ua = af / na.clamp_min(1e-12).unsqueeze(-1)
    ub = bf / nb.clamp_min(1e-12).unsqueeze(-1)
    omega = torch.arccos((ua * ub).sum(-1).clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    parallel = sin < _PARALLEL
    safe = torch.where(parallel, torch.ones_like(sin), sin)
    wa = torch.where(parallel, torch.full_like(sin, 1 - t), torch.sin((1 - t) * omega) / safe)
    wb = torch.where(parallel, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    e = wa.unsqueeze(-1) * ua + wb.unsqueeze(-1) * ub
    return e.to(a.dtype), na.to(a.dtype), nb.to(a.dtype), omega / math.pi


def retained_count(tokens: int, retain: float) -> int:
    """Tokens of a merged chunk kept unmerged: ``round(retain * tokens)``."""
    return min(tokens, int(retain * tokens + 0.5))


def retained_tokens(distance: torch.Tensor, count: int) -> torch.Tensor:
    """Positions ``[B, count]`` (ascending) of the tokens with the largest angular distance;
    ``distance`` ``[B, kv_heads, m]`` is averaged over the heads."""
    return distance.mean(dim=1).topk(count, dim=-1).indices.sort(dim=-1).values


def _complement(chosen: torch.Tensor, m: int) -> torch.Tensor:
    """Per row, the positions ``0..m-1`` not in ``chosen`` ``[B, r]`` (ascending): ``[B, m - r]``."""
    keep = torch.ones(chosen.shape[0], m, dtype=torch.bool, device=chosen.device)
    keep.scatter_(1, chosen, False)
    return keep.nonzero()[:, 1].view(chosen.shape[0], m - chosen.shape[1])


def _tokens(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``x`` ``[B, H, m(, D)]`` at per-sequence token positions ``pos`` ``[B, k]`` (a new tensor)."""
    return gather_tokens(x, pos[:, None, :])


def _scatter_tokens(out: torch.Tensor, pos: torch.Tensor, src: torch.Tensor) -> None:
    idx = pos[:, None, :, None].expand(out.shape[0], out.shape[1], pos.shape[-1], out.shape[-1])
    out.scatter_(2, idx, src)


class MergedStore:
    """One pair's merged K (or V): directions and norms of the merged tokens, exact vectors of the
    retained ones. Tokens ``0 .. tokens-1`` of both layers live here (older than the hot windows)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.direction: torch.Tensor | None = None  # [B, H, merged, D]
        self.norms: list[torch.Tensor | None] = [None, None]  # per layer of the pair: [B, H, merged]
        self.retained: list[torch.Tensor | None] = [None, None]  # per layer: [B, H, retained, D]
        self.retained_pos: torch.Tensor | None = None  # [B, retained] int64, ascending

    def add(self, a: torch.Tensor, b: torch.Tensor, t: float, retain: float) -> None:
        """Merge the next ``m`` tokens, ``a``/``b`` ``[B, H, m, D]`` (layers l-1 and l)."""
        m = a.shape[-2]
        e, na, nb, dist = slerp_merge(a, b, t)
        keep = retained_tokens(dist, retained_count(m, retain))
        merged = _complement(keep, m)
        parts = {"direction": _tokens(e, merged), "na": _tokens(na, merged), "nb": _tokens(nb, merged),
                 "ra": _tokens(a, keep), "rb": _tokens(b, keep)}
        cat = (lambda old, new: new if old is None else torch.cat([old, new], dim=-2 if new.dim() == 4 else -1))
        self.direction = cat(self.direction, parts["direction"])
        self.norms = [cat(self.norms[0], parts["na"]), cat(self.norms[1], parts["nb"])]
        self.retained = [cat(self.retained[0], parts["ra"]), cat(self.retained[1], parts["rb"])]
        pos = keep + self.tokens
        self.retained_pos = pos if self.retained_pos is None else torch.cat([self.retained_pos, pos], dim=-1)
        self.tokens += m

    def restore(self, side: int) -> torch.Tensor | None:
        """Layer ``side`` (0: l-1, 1: l) of the pair, ``[B, H, tokens, D]`` in position order."""
        if not self.tokens:
            return None
        b, h, _, d = self.direction.shape
        out = self.direction.new_empty(b, h, self.tokens, d)
        _scatter_tokens(out, _complement(self.retained_pos, self.tokens), self.direction * self.norms[side].unsqueeze(-1))
        _scatter_tokens(out, self.retained_pos, self.retained[side])
        return out

    def layer_bytes(self, side: int) -> dict[str, int]:
        """Bytes layer ``side`` holds here; the shared direction is counted on side 1."""
        return {"direction": nbytes(self.direction) if side == 1 else 0, "norms": nbytes(self.norms[side]),
                "retained": nbytes(self.retained[side]), "retained_positions": nbytes(self.retained_pos) if side else 0}


# --------------------------------------------------------------------------- layers


class MergedLayer(PolicyLayer, DynamicLayer):
    """One layer of a merged pair: a hot window of exact K/V plus the pair's merged store."""

    def __init__(self, cache: "MiniCacheCache", layer_idx: int, side: int,
                 stores: tuple[MergedStore, MergedStore], partner: "MergedLayer | None" = None) -> None:
        DynamicLayer.__init__(self)
        self._init_policy(cache, layer_idx, None)
        self.side, self.stores, self.partner = side, stores, partner  # partner: the first layer (side 1)

    def past_visible(self) -> int:
        return self.seen

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self.seen += key_states.shape[-2]
        merged_k, merged_v = (store.restore(self.side) for store in self.stores)
        keys = self.keys if merged_k is None else torch.cat([merged_k, self.keys], dim=-2)
        values = self.values if merged_v is None else torch.cat([merged_v, self.values], dim=-2)
        self.cache.note_transient(nbytes(keys, values))
        opts = self.cache.options
        if self.side == 1 and self.keys.shape[-2] > 2 * opts.window:  # both layers hold this step's tokens now
            m = self.keys.shape[-2] - opts.window
            first = self.partner
            self.stores[0].add(first.keys[..., :m, :], self.keys[..., :m, :], opts.t, opts.retain)
            self.stores[1].add(first.values[..., :m, :], self.values[..., :m, :], opts.t, opts.retain)
            for layer in (first, self):  # fresh tensors: the merged tokens' exact K/V are freed
                layer.keys, layer.values = layer.keys[..., m:, :].clone(), layer.values[..., m:, :].clone()
            self.cache.account(first.layer_idx)
        self.cache.account(self.layer_idx)
        return keys, values

    def reset(self) -> None:
        super().reset()
        for store in self.stores:
            store.__init__()

    def layer_bytes(self) -> dict[str, int]:
        """This layer's bytes by component (hot window, its share of the merged store)."""
        out = {"hot": nbytes(self.keys, self.values)}
        for store in self.stores:
            for name, b in store.layer_bytes(self.side).items():
                out[name] = out.get(name, 0) + b
        return out

    def tiers(self) -> dict[str, int]:
        parts = self.layer_bytes()
        return {"hot_kv": sum(b for name, b in parts.items() if name != "retained_positions"),
                "retained_positions": parts["retained_positions"]}


# --------------------------------------------------------------------------- cache


@register("minicache", "lossy: MiniCache (Liu et al. 2024) -- adjacent deep layers share one K/V direction per token",
          exact=False, needs_budget=False, options=MiniCacheOptions,
          paper="Liu et al. 2024, https://arxiv.org/abs/2405.14366")
class MiniCacheCache(KVBoundCache):
    def __init__(self, model, budget: int | None = None, **options: Any) -> None:
        if budget is not None:
            raise KVBoundError("minicache keeps every token and takes no budget (it merges layers, not tokens)")
        opts = self.options = self.parse_options(options)
        windows = layer_windows(model)
        n = len(windows)
        if opts.start is None:
            opts.start = n // 2
        if isinstance(opts.start, bool) or not isinstance(opts.start, int) or not 0 <= opts.start < n:
            raise KVBoundError(f"minicache option start must be a layer of the model, 0..{n - 1}, got {opts.start!r}")
        check_int(opts.window, "window", "minicache", 1)
        for name, value, closed in (("t", opts.t, True), ("retain", opts.retain, False)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                    0 <= value <= 1 if closed else 0 <= value < 1):
                raise KVBoundError(f"minicache option {name} must be in [0, 1{']' if closed else ')'}, got {value!r}")
        layers: list[Any] = [FullLayer(self, i) if w is None else FullSlidingLayer(self, i, w)
                             for i, w in enumerate(windows)]
        self.pairs: list[tuple[int, int]] = []
        for first in range(opts.start, n - 1, 2):
            if windows[first] is None and windows[first + 1] is None:
                stores = (MergedStore(), MergedStore())
                layers[first] = MergedLayer(self, first, 0, stores)
                layers[first + 1] = MergedLayer(self, first + 1, 1, stores, partner=layers[first])
                self.pairs.append((first, first + 1))
        if not self.pairs:
            raise KVBoundError(f"minicache: no two adjacent full-attention layers from layer {opts.start} on "
                               "(sliding-window layers are not merged); nothing to merge, use full")
        super().__init__(model, budget, layers)

    def bytes_by_layer(self) -> list[dict[str, int]]:
        """Per layer, the bytes it holds by component (``hot`` K/V; merged layers also ``direction``,
        ``norms``, ``retained``, ``retained_positions``)."""
        return [layer.layer_bytes() if isinstance(layer, MergedLayer) else {"hot": layer.tiers()["hot_kv"]}
                for layer in self.layers]

    def memory_report(self) -> dict[str, Any]:
        return {**super().memory_report(), "bytes_by_layer": self.bytes_by_layer(), "merged_pairs": self.pairs}
