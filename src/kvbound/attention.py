"""Tiered attention: attend to a kvbound layer's K/V tiers one block at a time, without concatenating them.

A bounded cache keeps its K/V in tiers: a hot window in memory, and older tokens that an exact
policy spills to a file or rebuilds from checkpoints. Instead of concatenating the tiers into one
tensor before attention (a copy of the whole span every step), attention runs over each block
separately and the partial results are merged exactly with their log-sum-exp -- the blockwise
softmax of FlashAttention (Dao et al. 2022) and of Ring Attention (Liu et al. 2023)::

    out = sum_i exp(lse_i - lse) * out_i,    lse = logsumexp_i(lse_i)

The function is registered in transformers' ``AttentionInterface`` as ``"kvbound"`` and selected per
model through ``attn_implementation`` (:func:`enable`, done when a kvbound cache is built for a model
running ``sdpa``). Calls that are not for a kvbound tiered layer go to transformers' own ``sdpa``
attention unchanged, except one query row of grouped-query attention on a CPU (a decode step), which
runs the fused kernel with each group's heads as its query rows (:func:`decode_gqa`). The active cache is found through a context variable that kvbound's stateless
attention hooks (:func:`kvbound.recompute.attach`) push before each attention module runs and pop after.

What a layer hands over is a :class:`TierStep`: the tensors its ``update`` returned (the identity
check that this call is the same step), the older blocks every query of the step may see (subject to
the layer's mask: transformers builds it over all visible keys, blocks first), and, for the scored
eviction policies, a callback that receives the attention probabilities of the step's newest query
rows: the model's own query and the call's own log-sum-exp, ``exp(q.k * scaling - lse)`` (the
attention output itself stays the fused kernel's, as a plain layer's call computes it).
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .errors import KVBoundError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

NAME = "kvbound"
FALLBACK = "sdpa"
QUERY_CHUNK = 256  # query rows per block of the explicit (softcapped) attention (bounds its logits)
MASS_BLOCK_BYTES = 2 << 20  # float32 logits per block of queries when scoring (see mass_from_lse)

Block = tuple[torch.Tensor, torch.Tensor]  # keys, values: [B, kv_heads, n, D]


@dataclass
class LazyBlock:
    """A block built only when attention reaches it: ``load()`` returns its K/V. Lazy blocks may
    share one buffer (a codec'd store decodes each span into it), so attention reads each block
    before it loads the next. ``attend(query, scaling, softcap)``, when given, computes the block's
    attention itself where every query sees every key (a codec'd store's kernel reads its records
    without decoding them): a list of ``(out, lse)`` parts, merged like the other blocks', or
    ``None`` to have the block loaded and attended as usual."""

    tokens: int
    load: Callable[[], Block]
    attend: Callable[[torch.Tensor, float, float | None], list[tuple[torch.Tensor, torch.Tensor]] | None] | None = None


def block_tokens(block: "Block | LazyBlock") -> int:
    return block.tokens if isinstance(block, LazyBlock) else block[0].shape[-2]


def load_block(block: "Block | LazyBlock") -> Block:
    return block.load() if isinstance(block, LazyBlock) else block

# Dtypes whose blocks are merged by tiered attention. Below float32 each block's output is rounded
# to the model's dtype before the merge (and once more after it), where one attention call over the
# concatenation rounds once; in bf16 that flipped near-tie greedy tokens (offload and residual
# matched bf16 `full` on 59% of tokens instead of 100%). Layers in other dtypes concatenate their
# tiers, which keeps the exact policies bit-identical to `full`.
TIERED_DTYPES = (torch.float32,)


@dataclass
class TierStep:
    """What a layer's ``update`` leaves for the attention call of the same step.

    * ``keys`` -- the tensor ``update`` returned (attention must receive this very object);
    * ``blocks`` -- older K/V blocks (or :class:`LazyBlock`), in position order, that come before
      ``keys`` in the mask;
    * ``rows`` / ``scored`` -- the scored policies: ``scored(query_rows, mass)`` is called after
      attention with the newest ``rows`` query rows and the attention mass ``[B, kv_heads, n]``
      they gave the keys of ``keys`` (summed over those rows and the query heads of each KV head);
      with ``per_query`` the mass keeps one row per query, ``[B, kv_heads, rows, n]``;
    * ``release`` -- called once attention is done with the blocks (drop mapped pages);
    * ``key_bias`` -- ragged heads (:mod:`kvbound.cache.allocation`): an additive float32 bias
      ``[B, kv_heads, n]`` over the keys of ``keys``, ``-inf`` where a head holds no token (the step's
      padding of heads shorter than the longest), ``log m`` on a compensation token that stands for
      ``m`` dropped tokens (RazorAttention); it applies to the output and to the scored mass;
    * ``fit_mask`` -- the layers of this kind hold different numbers of past keys (per-layer budgets),
      while transformers builds one mask from the first layer's: every past key is visible (unpadded
      input) and the mask's last ``T`` columns (the step's own keys) apply.
    """

    keys: torch.Tensor
    blocks: list["Block | LazyBlock"] = field(default_factory=list)
    rows: int = 0
    scored: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    per_query: bool = False
    release: Callable[[], None] | None = None
    key_bias: torch.Tensor | None = None
    fit_mask: bool = False


# --------------------------------------------------------------------------- active cache

_ACTIVE: contextvars.ContextVar[tuple[Any, ...]] = contextvars.ContextVar("kvbound_active_cache", default=())


def push(cache: Any) -> None:
    """Called before an attention module runs: the cache of this call (or ``None``)."""
    _ACTIVE.set(_ACTIVE.get() + (cache,))


def pop() -> None:
    """Called after an attention module ran (also on exceptions)."""
    stack = _ACTIVE.get()
    _ACTIVE.set(stack[:-1])


def reset() -> None:
    """Called when a whole forward pass starts (drops entries an interrupted pass left)."""
    _ACTIVE.set(())


def active_cache() -> Any:
    """The kvbound cache whose attention module is running now, if it runs tiered attention."""
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


# --------------------------------------------------------------------------- registration


def register() -> None:
    """Register ``"kvbound"`` in transformers' attention and mask registries (idempotent)."""
    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, kvbound_attention_forward)
    if NAME not in AttentionMaskInterface._global_mapping:
        AttentionMaskInterface.register(NAME, sdpa_mask)  # same masks as sdpa: bool, or None when skippable


def enable(model: "PreTrainedModel") -> bool:
    """Run ``model``'s attention through :func:`kvbound_attention_forward` if it uses ``sdpa``.

    Returns whether the model runs tiered attention. Models on another implementation (eager,
    flash...) are left alone: kvbound caches then fall back to concatenating their tiers.
    """
    register()
    impl = model.config._attn_implementation
    if impl == FALLBACK:
        model.set_attn_implementation(NAME)
        impl = NAME
    return impl == NAME


def is_tiered(module: torch.nn.Module) -> bool:
    """Whether an attention module dispatches to kvbound's function."""
    config = getattr(module, "config", None)
    return getattr(config, "_attn_implementation", None) == NAME


# --------------------------------------------------------------------------- math


def _visible(mask: torch.Tensor | None) -> torch.Tensor | None:
    """A boolean 'may attend' mask from transformers' bool or additive float mask."""
    if mask is None or mask.dtype == torch.bool:
        return mask
    return mask > torch.finfo(mask.dtype).min / 2


def block_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor | None,
                    scaling: float, softcap: float | None = None,
                    bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` ``[B, H, T, D]`` over one block ``[B, kv_heads, n, D]`` (GQA: query
    head ``h`` reads KV head ``h // groups``). ``visible`` ``[B or 1, 1, T, n]`` bool or ``None``;
    ``bias`` ``[B, kv_heads, n]`` float, added to each KV head's logits (``-inf``: a ragged head's padding).

    Returns ``(out [B, H, T, D], lse [B, H, T] float32)``; rows that see no key get ``lse = -inf``.
    On CPU without softcapping this is PyTorch's fused flash kernel (reads strided K/V in place;
    one query row is folded, see :func:`decode_gqa`); otherwise an explicit softmax in query chunks.
    """
    if bias is not None:
        return _biased_attention(query, keys, values, visible, scaling, softcap, bias)
    if _flash_cpu(query, softcap):
        mask = None
        if visible is not None:
            mask = torch.zeros(visible.shape, dtype=query.dtype, device=query.device).masked_fill_(~visible, float("-inf"))
        b, h, t, d = query.shape
        kv = keys.shape[1]
        fold = t == 1 and h > kv  # one query row: the group's heads become the query rows (see decode_gqa)
        q = query.reshape(b, kv, h // kv, d) if fold else query
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, keys, values, 0.0, False, attn_mask=mask, scale=scaling)
        if fold:
            out, lse = out.reshape(b, h, 1, values.shape[-1]), lse.reshape(b, h, 1)
        lse = lse.float()
    else:
        out, lse = _explicit(query, keys, values, visible, scaling, softcap)
    if visible is not None:
        none = ~visible.any(-1)  # [B or 1, 1, T]
        if bool(none.any()):
            lse = lse.masked_fill(none, float("-inf"))
            out = out.masked_fill(none.unsqueeze(-1), 0.0)
    return out, lse


def causal_lse(query: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """Log-sum-exp ``[B, H, T]`` (float32) of each of ``T`` queries over ``T`` keys of the same
    positions, causally (query ``i`` sees keys ``0..i``; GQA as :func:`block_attention`). On CPU
    without softcapping: the fused flash kernel's own causal mode, no mask tensor."""
    t = query.shape[-2]
    if keys.shape[-2] != t:
        raise ValueError(f"causal_lse needs as many keys as queries, got {keys.shape[-2]} and {t}")
    if query.device.type == "cpu" and not softcap and query.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, keys, keys, 0.0, True, scale=scaling)[1].float()
    visible = torch.ones(t, t, dtype=torch.bool, device=query.device).tril_().view(1, 1, t, t)
    return block_attention(query, keys, keys, visible, scaling, softcap)[1]


def _biased_attention(query, keys, values, visible, scaling, softcap, bias):
    """:func:`block_attention` with a per-KV-head additive ``bias`` ``[B, kv_heads, n]``: one fused
    call with a per-head float mask (CPU flash kernel), or the explicit softmax (softcapping, GPU)."""
    b, heads, t, _ = query.shape
    kv_heads, n = keys.shape[1], keys.shape[-2]
    if query.device.type == "cpu" and not softcap and query.dtype in (torch.float32, torch.bfloat16, torch.float16):
        head_bias = bias.to(query.dtype).repeat_interleave(heads // kv_heads, dim=1).unsqueeze(2)  # [B, H, 1, n]
        past = n - t
        if visible is None or (t > 1 and 0 < past and _past_then_causal(visible, past) and not bool(bias[..., past:].any())):
            return _biased_split(query, keys, values, head_bias, 0 if visible is None else past, scaling)
        # the per-head mask is [B, H, rows, n]: a block of query rows at a time bounds it (a 1024-token
        # prefill chunk over 2.5k keys would otherwise allocate ~90 MB for it)
        rows = max(1, MASS_BLOCK_BYTES // (query.element_size() * b * heads * max(n, 1)))
        outs, lses, blind = [], [], []
        for start in range(0, t, rows):
            stop = min(t, start + rows)
            if visible is not None:
                mask = head_bias.masked_fill(~visible[..., start:stop, :], float("-inf"))
            else:
                mask = head_bias.expand(-1, -1, stop - start, -1)
            o, l = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query[:, :, start:stop], keys, values, 0.0, False, attn_mask=mask, scale=scaling)
            outs.append(o)
            lses.append(l)
            # rows that see no key (padding everywhere, masked), from this block's mask: never a
            # [B, H, T, n] mask for the whole step
            blind.append(torch.isneginf(mask).all(-1))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        lse = (lses[0] if len(lses) == 1 else torch.cat(lses, dim=2)).float()
        none = blind[0] if len(blind) == 1 else torch.cat(blind, dim=2)  # [B, H, T]
        if bool(none.any()):  # zeros and lse = -inf, as block_attention's
            lse = lse.masked_fill(none, float("-inf"))
            out = out.masked_fill(none.unsqueeze(-1), 0.0)
        return out, lse
    return _explicit(query, keys, values, visible, scaling, softcap, bias)  # all -inf rows: zeros, lse = -inf


def _past_then_causal(visible: torch.Tensor, past: int) -> bool:
    """Whether ``visible`` ``[B or 1, 1, T, past + T]`` shows every query all ``past`` keys and the
    step's own keys causally (a prefill chunk after a held past)."""
    t = visible.shape[-2]
    if not bool(visible[..., :past].all()):
        return False
    return bool((visible[..., past:] == torch.ones(t, t, dtype=torch.bool, device=visible.device).tril_()).all())


def _biased_split(query, keys, values, head_bias, past, scaling):
    """Biased attention without a per-row mask: every query sees the first ``past`` keys under
    ``head_bias`` (one broadcast ``[B, H, 1, past]`` mask for all rows), and the step's own keys
    causally (the flash kernel's causal mode; their bias is zero), merged exactly by log-sum-exp.
    ``past`` 0: every key visible to every query, one call."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if past == 0:
        out, lse = flash(query, keys, values, 0.0, False, attn_mask=head_bias, scale=scaling)[:2]
        parts = [(out, lse.float(), head_bias)]
    else:
        out_a, lse_a = flash(query, keys[..., :past, :], values[..., :past, :], 0.0, False,
                             attn_mask=head_bias[..., :past], scale=scaling)[:2]
        out_b, lse_b = flash(query, keys[..., past:, :], values[..., past:, :], 0.0, True, scale=scaling)[:2]
        parts = [(out_a, lse_a.float(), head_bias[..., :past]), (out_b, lse_b.float(), None)]
    fixed = []
    for out, lse, bias in parts:  # a head whose keys here are all padding sees nothing: zeros, lse = -inf
        if bias is not None:
            blind = torch.isneginf(bias).all(-1)  # [B, H, 1]
            if bool(blind.any()):
                lse = lse.masked_fill(blind, float("-inf"))
                out = out.masked_fill(blind.unsqueeze(-1), 0.0)
        fixed.append((out, lse))
    if len(fixed) == 1:
        return fixed[0]
    return merge(fixed, inplace=True), torch.logaddexp(fixed[0][1], fixed[1][1])  # both outputs are this call's own


def _explicit(query, keys, values, visible, scaling, softcap, bias=None):
    """Softmax attention written out (float32 logits), ``QUERY_CHUNK`` query rows at a time.
    Returns ``(out [B, H, T, D], lse [B, H, T])``."""
    outs, lses = [], []
    for start in range(0, query.shape[-2], QUERY_CHUNK):
        q = query[:, :, start:start + QUERY_CHUNK]
        logits = masked_logits(q, keys, None if visible is None else visible[..., start:start + q.shape[-2], :],
                               scaling, softcap)  # [B, kv, g, tc, n]
        if bias is not None:
            logits = logits + bias[:, :, None, None, :]
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - lse.unsqueeze(-1)).nan_to_num(0.0)  # rows seeing nothing: 0, not NaN
        b, kv, g, tc, n = probs.shape
        out = torch.matmul(probs.view(b, kv, g * tc, n), values.float())
        outs.append(out.view(b, kv * g, tc, -1))
        lses.append(lse.reshape(b, kv * g, tc))
    return torch.cat(outs, dim=2).to(query.dtype), torch.cat(lses, dim=2)


def masked_logits(query, keys, visible, scaling, softcap) -> torch.Tensor:
    """Masked float32 logits ``[B, kv_heads, groups, T, n]`` (query head ``h`` reads KV head ``h // groups``).

    ``visible`` (bool) is ``[B or 1, 1 or kv_heads, T, n]``; ``softcap`` as Gemma 2's ``tanh`` capping."""
    b, heads, t, d = query.shape
    kv_heads, n = keys.shape[1], keys.shape[-2]
    groups = heads // kv_heads
    q = query.float().reshape(b, kv_heads, groups * t, d)
    logits = (torch.matmul(q, keys.float().transpose(-1, -2)) * scaling).view(b, kv_heads, groups, t, n)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if visible is not None:
        logits = logits.masked_fill(~visible.unsqueeze(2), float("-inf"))
    return logits


def mass_from_lse(query: torch.Tensor, keys: torch.Tensor,
                  visible: torch.Tensor | Callable[[int, int], torch.Tensor] | None, lse: torch.Tensor | None,
                  scaling: float, softcap: float | None = None, per_query: bool = False,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Probability each key got from each query, ``exp(logit - lse)``, summed over the query heads of
    each KV head and over the queries: ``[B, kv_heads, n]`` float32 (``per_query``: one row per
    query, ``[B, kv_heads, T, n]``).

    ``lse`` ``[B, H, T]`` is the attention call's own log-sum-exp; ``None`` normalizes over ``keys``
    (a plain softmax). ``visible`` (bool) is ``[B or 1, 1 or kv_heads, T, n]``, ``None`` (all), or a
    function ``(start, stop)`` giving the rows of queries ``start:stop`` (built one block at a time).
    ``bias`` ``[B, kv_heads, n]`` is added to each KV head's logits (ragged heads, see :class:`TierStep`).

    Memory: the queries go in blocks of at most :data:`MASS_BLOCK_BYTES` of float32 logits, all
    computed in one reused buffer (in-place scaling, masking and ``exp``). One fresh tensor per block
    and per operation -- what a straightforward version allocates -- left glibc's heap fragmented: an
    H2O prefill (every query scored) grew the process by ~0.4 GiB more than its live tensors.
    """
    b, heads, t, d = query.shape
    kv_heads, n = keys.shape[1], keys.shape[-2]
    groups = heads // kv_heads
    out = torch.zeros(b, kv_heads, *((t,) if per_query else ()), n, dtype=torch.float32, device=keys.device)
    if t == 0 or n == 0:
        return out
    block = max(1, min(t, MASS_BLOCK_BYTES // (4 * b * heads * n)))
    keys_t = keys.float().transpose(-1, -2)  # a copy only for non-float32 keys, once per call
    buf = torch.empty(b * heads * block * n, dtype=torch.float32, device=keys.device)
    for start in range(0, t, block):
        tc = min(block, t - start)
        q = query[:, :, start:start + tc].float().reshape(b, kv_heads, groups * tc, d)
        logits = torch.matmul(q, keys_t, out=buf[:b * heads * tc * n].view(b, kv_heads, groups * tc, n))
        logits = logits.mul_(scaling).view(b, kv_heads, groups, tc, n)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        if bias is not None:
            logits.add_(bias[:, :, None, None, :])
        if visible is not None:
            vis = visible(start, start + tc) if callable(visible) else visible[..., start:start + tc, :]
            logits.masked_fill_(~vis.unsqueeze(2), float("-inf"))
        if lse is None:  # softmax over the keys, in place
            probs = logits.sub_(logits.amax(-1, keepdim=True)).exp_()
            probs.div_(probs.sum(-1, keepdim=True))
        else:
            probs = logits.sub_(lse[:, :, start:start + tc].reshape(b, kv_heads, groups, tc, 1)).exp_()
        probs.nan_to_num_(0.0)  # rows seeing nothing: 0, not NaN
        if per_query:
            out[:, :, start:start + tc] = probs.sum(2)
        else:
            out += probs.sum(dim=(2, 3))
    return out


def merge(parts: list[tuple[torch.Tensor, torch.Tensor]], inplace: bool = False) -> torch.Tensor:
    """Exact softmax over the union of blocks from per-block ``(out, lse)`` (log-sum-exp weights).
    ``inplace``: two float32 outputs the caller owns are merged into the first (no temporaries)."""
    if len(parts) == 1:
        return parts[0][0]
    if len(parts) == 2:  # the common case (offloaded blocks + the hot window): weights are sigmoids
        (o1, l1), (o2, l2) = parts
        w1 = torch.sigmoid(l1 - l2).nan_to_num_(0.0).unsqueeze(-1)  # both -inf (no key seen): 0
        w2 = torch.sigmoid(l2 - l1).nan_to_num_(0.0).unsqueeze(-1)
        if inplace and o1.dtype == o2.dtype == torch.float32:
            return o1.mul_(w1).add_(o2.mul_(w2))
        return (w1 * o1.float() + w2 * o2.float()).to(o1.dtype)
    lses = torch.stack([lse for _, lse in parts])  # [P, B, H, T]
    total = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - total).nan_to_num(0.0).unsqueeze(-1)  # [P, B, H, T, 1]
    out = weights[0] * parts[0][0].float()
    for w, (o, _) in zip(weights[1:], parts[1:]):
        out += w * o.float()
    return out.to(parts[0][0].dtype)


def tiered_attention(query: torch.Tensor, blocks: list["Block | LazyBlock"], keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None, scaling: float, softcap: float | None = None,
                     sinks: torch.Tensor | None = None, mass_rows: int = 0, per_query: bool = False,
                     key_bias: torch.Tensor | None = None, fit_mask: bool = False):
    """Attention of ``query`` over ``blocks`` followed by ``keys``/``values``, merged exactly.

    ``mask`` (transformers', over every block then ``keys``; bool, additive float, or ``None``:
    blocks fully visible and ``keys`` causal, bottom-right aligned). ``sinks`` (``[heads]``, gpt-oss
    style) add ``exp(sink)`` to each softmax denominator. With ``mass_rows`` the newest query rows'
    probabilities over ``keys`` are returned too (:func:`mass_from_lse`, one row per query with
    ``per_query``). ``key_bias`` ``[B, kv_heads, n]`` is added to the logits of ``keys`` (ragged heads:
    :class:`TierStep`). Returns ``(out [B, H, T, D], mass or None)``.
    """
    t = query.shape[-2]
    n_old = sum(block_tokens(b) for b in blocks)
    total = n_old + keys.shape[-2]
    visible = _visible(mask)
    if fit_mask and visible is not None and visible.shape[-1] != total:  # another layer's past: all visible
        visible = torch.cat([visible.new_ones(*visible.shape[:-1], total - t), visible[..., -t:]], dim=-1)
    if visible is not None and visible.shape[-1] != total:
        raise RuntimeError(f"kvbound attention: mask covers {visible.shape[-1]} keys, the tiers hold {total}")
    if visible is None and t > 1:  # causal over the newest keys, every older key visible
        q_pos = torch.arange(total - t, total, device=query.device)
        visible = (torch.arange(total, device=query.device)[None, :] <= q_pos[:, None]).view(1, 1, t, total)
    parts = []
    col = 0
    for block in blocks:
        n = block_tokens(block)
        vis = None if visible is None else visible[..., col:col + n]
        if vis is not None and bool(vis.all()):
            vis = None
        col += n
        attended = block.attend(query, scaling, softcap) if vis is None and getattr(block, "attend", None) else None
        if attended is not None:
            parts.extend(attended)
            continue
        k, v = load_block(block)  # a lazy block may reuse the previous one's buffer: read it now
        parts.append(block_attention(query, k, v, vis, scaling, softcap))
    if sinks is not None:
        b, h = query.shape[:2]
        parts.append((torch.zeros_like(query), sinks.float().view(1, h, 1).expand(b, h, t)))
    vis = None if visible is None else visible[..., col:]
    parts.append(block_attention(query, keys, values, vis, scaling, softcap, key_bias))
    rows = min(mass_rows, t)
    if not rows:
        return merge(parts), None
    lse = torch.logsumexp(torch.stack([part_lse[..., t - rows:] for _, part_lse in parts]), dim=0)
    mass = mass_from_lse(query[:, :, t - rows:], keys, None if vis is None else vis[..., t - rows:, :], lse,
                         scaling, softcap, per_query, key_bias)
    return merge(parts), mass


# --------------------------------------------------------------------------- the registered function


def kvbound_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, softcap: float | None = None, **kwargs: Any):
    """transformers attention function: tiered attention for a kvbound layer's step, ``sdpa`` otherwise.

    A batch of caches (:class:`kvbound.batching.CacheBatch`, any active cache with ``attend_rows``)
    attends each row to its own cache's K/V instead."""
    step = None
    cache = active_cache()
    if cache is not None and getattr(cache, "attend_rows", None) is not None:
        return cache.attend_rows(module, query, key, value, dropout=dropout, scaling=scaling, softcap=softcap, **kwargs)
    layer_idx = getattr(module, "layer_idx", None)
    if cache is not None and layer_idx is not None:
        step = take_step(cache.layers[layer_idx], key)
    return attend_step(module, query, key, value, attention_mask, step, dropout, scaling, softcap, **kwargs)


def take_step(layer: Any, key: torch.Tensor) -> TierStep | None:
    """The :class:`TierStep` ``layer`` left for the attention call on ``key`` (and clear it); ``None``
    if there is none or it is stale (not this step's tensors)."""
    step = getattr(layer, "pending_step", None)
    if step is None:
        return None
    layer.pending_step = None
    return step if step.keys is key else None


def _flash_cpu(query: torch.Tensor, softcap: float | None) -> bool:
    """Whether :func:`block_attention` runs PyTorch's fused CPU flash kernel for ``query``."""
    return query.device.type == "cpu" and not softcap and query.dtype in (torch.float32, torch.bfloat16, torch.float16)


def decode_gqa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               softcap: float | None = None, **kwargs: Any) -> torch.Tensor | None:
    """One query row of grouped-query attention on a CPU, as :func:`block_attention` computes it: the
    fused flash kernel with the group's query heads as its query rows, ``[B, kv_heads, groups, D]``
    against the unrepeated keys (``[B, 1, heads, D]`` out, as ``sdpa``'s). ``None`` where it does not
    apply (several query rows, no groups, a softcap, attention sinks, dropout, not a CPU).

    transformers' ``sdpa`` runs the kernel with every head as its own query (``enable_gqa`` on a CPU
    when there is no mask), which is slow for one row: measured on this repository's 2-core CPU
    (torch 2.13), 14 query heads over 2 KV heads and 2,000 keys take 1.56 ms in bfloat16 and 0.20 ms
    in float32, against 0.12 ms and 0.11 ms folded. The fold sums in another order (within float
    rounding of ``sdpa``, not its bits). Every kvbound decode step runs it, tiered or not, alone or
    batched, so a plain layer and a tiered one holding the same keys still agree bit for bit."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (query.shape[2] != 1 or groups <= 1 or dropout or not _flash_cpu(query, softcap)
            or kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None
            or key.shape[1] * groups != query.shape[1]):
        return None
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    visible = _visible(attention_mask)
    if visible is not None and visible.shape[1] != 1:  # per-head masks: not this fast path
        return None
    out, _ = block_attention(query, key, value, visible, scaling)
    return out.transpose(1, 2).contiguous()


def attend_step(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, step: TierStep | None, dropout: float = 0.0,
                scaling: float | None = None, softcap: float | None = None, **kwargs: Any):
    """One attention call: tiered over ``step``'s blocks; without a step, :func:`decode_gqa` for one
    query row, else transformers' ``sdpa``."""
    if step is None:
        folded = decode_gqa(module, query, key, value, attention_mask, dropout, scaling, softcap, **kwargs)
        if folded is not None:
            return folded, None
        return ALL_ATTENTION_FUNCTIONS[FALLBACK](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                        softcap=softcap, **kwargs)
    try:
        if dropout:
            raise KVBoundError("kvbound caches run attention for inference only (dropout > 0); call model.eval()")
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        softcap = softcap if softcap is not None else getattr(module, "attn_logit_softcapping", None)
        out, mass = tiered_attention(query, step.blocks, key, value, attention_mask, scaling, softcap,
                                     sinks=kwargs.get("s_aux"), mass_rows=step.rows if step.scored else 0,
                                     per_query=step.per_query, key_bias=step.key_bias, fit_mask=step.fit_mask)
    finally:
        if step.release is not None:
            step.release()
    if step.scored is not None and step.rows:
        step.scored(query[:, :, -step.rows:], mass)
    return out.transpose(1, 2).contiguous(), None
