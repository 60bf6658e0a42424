"""Self-speculative exact greedy decoding: a lossy hot cache drafts, an exact cache verifies.

After TriForce (Sun et al. 2024), inside one model: a lossy draft cache (``streaming`` by default:
its attention sinks make drafts agree far more often than a bare ``window``) at the
budget drafts up to ``k`` tokens greedily; ONE forward pass of the drafted block through an
exact cache (``offload``, ``kv-direct``; ``full`` in tests) gives the exact model's greedy
token after every prefix. The longest prefix of drafts that matches is accepted, plus the exact
model's own next token; the exact cache rolls back what it took beyond that
(:meth:`~kvbound.cache.base.KVBoundCache.truncate`), and the draft cache restarts from the exact
cache's hot window (``adopt_recent`` on its layers), so every round drafts from exact K/V.

Every emitted token is the exact model's argmax given the exact prefix, so the output is the
greedy output of the exact cache, which equals greedy with ``full``. Numerical caveat: the
verification runs a ``k+1``-token forward where plain greedy runs 1-token forwards; the matmul
row grouping differs, so logits (and the K/V kept from the block) differ at the ~1e-6 level and
a near-tie -- top-two logits closer than that -- could resolve differently. ``stats.min_margin``
reports the smallest top-1/top-2 logit gap among emitted tokens so such a case is visible.

Batch size 1 and greedy only: sampling would need rejection sampling against the exact
distribution and is refused.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch

from .cache import make_cache
from .cache.base import KVBoundCache
from .cache.registry import get_policy, registered
from .errors import KVBoundError
from .generation import DEFAULT_PREFILL_CHUNK, Timings, check_chunk, check_positions, chunked_part, now, prefill

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel

WARMUP = 4  # first prompt tokens fed to the draft cache itself (streaming keeps them as sinks)


@dataclass
class SpeculationStats:
    """What one :func:`speculative_greedy` call did."""

    k: int
    draft: str
    verifications: int = 0  # exact forward passes after the prefill (which gives the first token)
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens the exact model agreed with
    new_tokens: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    min_margin: float = float("inf")  # smallest top-1 minus top-2 logit among emitted tokens
    draft_peak_hot_kv_bytes: int = 0

    @property
    def mean_accepted(self) -> float:
        """Draft tokens accepted per verification (0 .. k)."""
        return self.accepted / self.verifications if self.verifications else 0.0

    @property
    def draft_time_share(self) -> float:
        total = self.draft_seconds + self.verify_seconds
        return self.draft_seconds / total if total else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(mean_accepted=self.mean_accepted, draft_time_share=self.draft_time_share,
                   tokens_per_verification=(self.new_tokens - 1) / self.verifications if self.verifications else 0.0)
        return out


def draft_policies() -> list[str]:
    """Registered lossy policies that can draft (restart from an exact hot window)."""
    return [name for name, spec in registered().items() if not spec.exact and spec.can_draft]


def _check_args(model, input_ids, exact_cache, draft: str, k: int, max_new_tokens: int, do_sample: bool) -> None:
    if do_sample:
        raise KVBoundError("speculative decoding is greedy only (its output equals greedy with the full cache); "
                           "sampling is not supported -- drop the sampling options or --speculate")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise KVBoundError(f"speculative decoding takes one sequence (batch size 1), got input_ids of shape "
                           f"{tuple(input_ids.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise KVBoundError(f"speculate (draft tokens per verification) must be a whole number >= 1, got {k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise KVBoundError(f"max_new_tokens must be a whole number >= 0, got {max_new_tokens!r}")
    if (not isinstance(exact_cache, KVBoundCache) or not get_policy(exact_cache.policy_name).can_rollback
            or not exact_cache.exact):  # e.g. offload with a lossy codec
        exact = [name for name, spec in registered().items() if spec.exact and spec.can_rollback]
        lossy = " made lossy by its options (codec)" if isinstance(exact_cache, KVBoundCache) and not exact_cache.exact else ""
        raise KVBoundError(f"speculative decoding verifies with an exact cache; got "
                           f"{getattr(exact_cache, 'policy_name', type(exact_cache).__name__)!r}{lossy}, valid: {', '.join(exact)}")
    if get_policy(draft).exact:
        raise KVBoundError(f"draft policy must be lossy (a cheap hot cache), got exact {draft!r}; "
                           f"valid drafts: {', '.join(draft_policies())}")


def _restart_draft(draft_cache: KVBoundCache, exact_cache: KVBoundCache) -> None:
    """The draft's hot window becomes the exact cache's (same tokens, exact K/V)."""
    for dl, el in zip(draft_cache.layers, exact_cache.layers):
        dl.adopt_recent(el.keys, el.values, el.seen)


def _margins(logits: torch.Tensor) -> float:
    top = logits.float().topk(2, dim=-1).values
    return float((top[..., 0] - top[..., 1]).min())


@torch.no_grad()
def speculative_greedy(
    model: "PreTrainedModel",
    input_ids: torch.Tensor,
    exact_cache: KVBoundCache,
    draft: str = "streaming",
    budget: int | None = None,
    k: int = 4,
    max_new_tokens: int = 64,
    eos_token_id: int | list[int] | None = None,
    draft_options: dict[str, Any] | None = None,
    do_sample: bool = False,
    adaptive: bool = True,
    prefill_chunk: int | None = DEFAULT_PREFILL_CHUNK,
    timings: Timings | None = None,
) -> tuple[torch.Tensor, SpeculationStats]:
    """Greedy-decode up to ``max_new_tokens`` after ``input_ids`` with exact output, drafting
    ``k`` tokens at a time with a lossy ``draft`` cache at ``budget`` (default: the exact
    cache's budget).

    ``input_ids`` may start with tokens already in ``exact_cache`` (earlier turns). Stops after
    an ``eos_token_id`` like greedy does. Returns ``(new_ids [1, n], stats)``; afterwards the
    exact cache holds the prompt and every new token but the last (as after ``generate``).
    With ``adaptive`` the draft length follows acceptance (up to ``k``: +2 after a fully
    accepted block, -1 after a rejection, like transformers' assisted generation heuristic).
    The prompt is fed to the exact cache ``prefill_chunk`` tokens per forward pass (``None``: one
    pass, see :func:`kvbound.generation.prefill`); ``timings`` receives the prefill/decode split.
    """
    _check_args(model, input_ids, exact_cache, draft, k, max_new_tokens, do_sample)
    check_chunk(prefill_chunk)
    check_positions(model, input_ids.shape[1], max_new_tokens)
    timings = Timings() if timings is None else timings
    budget = exact_cache.budget if budget is None else budget
    if budget is None:
        raise KVBoundError(f"the draft cache needs a budget (tokens kept hot); pass budget=... "
                           f"(the exact policy {exact_cache.policy_name!r} has none)")
    if not get_policy(draft).can_draft:
        raise KVBoundError(f"draft policy {draft!r} cannot restart from the exact cache's hot window; "
                           f"valid drafts: {', '.join(draft_policies())}")
    draft_cache = make_cache(model, draft, budget, **(draft_options or {}))
    eos = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    stats = SpeculationStats(k=k, draft=draft)
    seen = exact_cache.get_seq_length()
    if input_ids.shape[1] <= seen:
        raise KVBoundError(f"input_ids ({input_ids.shape[1]} tokens) must extend the {seen} tokens already in the cache")
    out: list[int] = []
    if max_new_tokens == 0:
        return input_ids.new_zeros((1, 0)), stats
    begin = now()
    warm = min(WARMUP, budget, input_ids.shape[1] - 1)
    if warm > 0:  # the draft sees the first tokens itself: policies that keep them (sinks) can
        model(input_ids[:, :warm], past_key_values=draft_cache, use_cache=True)

    t0 = time.perf_counter()
    cut = chunked_part(seen, input_ids.shape[1], prefill_chunk)
    if cut > seen:
        prefill(model, input_ids[:, :cut], exact_cache, prefill_chunk)
    logits = model(input_ids[:, cut:], past_key_values=exact_cache, use_cache=True, logits_to_keep=1).logits[0, -1:]
    stats.verify_seconds += time.perf_counter() - t0
    timings.stamps.append(now())  # the first token
    stats.min_margin = _margins(logits)
    nxt = int(logits.argmax(-1))
    out.append(nxt)

    k_now = k
    while len(out) < max_new_tokens and nxt not in eos:
        _restart_draft(draft_cache, exact_cache)
        # draft: at most what is still needed (the verification adds one token of its own)
        t0 = time.perf_counter()
        drafts: list[int] = []
        tok = nxt
        for _ in range(min(k_now, max_new_tokens - len(out) - 1)):
            step = torch.tensor([[tok]], device=input_ids.device)
            tok = int(model(step, past_key_values=draft_cache, use_cache=True).logits[0, -1].argmax())
            drafts.append(tok)
            if tok in eos:
                break
        stats.draft_peak_hot_kv_bytes = max(stats.draft_peak_hot_kv_bytes, draft_cache.peak_hot_kv_bytes)
        t1 = time.perf_counter()
        stats.draft_seconds += t1 - t0

        # verify the whole block [nxt, d1..dk] in one exact forward
        block = torch.tensor([[nxt, *drafts]], device=input_ids.device)
        logits = model(block, past_key_values=exact_cache, use_cache=True).logits[0]
        exact_next = logits.argmax(-1).tolist()
        m = 0
        while m < len(drafts) and drafts[m] == exact_next[m]:
            m += 1
        exact_cache.truncate(len(drafts) - m)  # keep nxt, d1..dm
        stats.verify_seconds += time.perf_counter() - t1
        stats.verifications += 1
        stats.drafted += len(drafts)
        stats.accepted += m
        if adaptive:
            k_now = min(k, k_now + 2) if m == len(drafts) else max(1, k_now - 1)
        stats.min_margin = min(stats.min_margin, _margins(logits[: m + 1]))

        for tok in [*drafts[:m], exact_next[m]]:
            out.append(tok)
            if tok in eos:
                break
        nxt = out[-1]
    # an EOS among accepted drafts: drop what the exact cache took after it
    extra = exact_cache.get_seq_length() - (input_ids.shape[1] + len(out) - 1)
    if extra > 0:
        exact_cache.truncate(extra)
    stats.new_tokens = timings.new_tokens = len(out)
    timings.split(begin, now())
    return torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device), stats
