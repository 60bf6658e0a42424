"""Agreement with the uncompressed model, and process memory.

All agreement metrics compare a policy's tokens with ``full``'s tokens *at the same position*
for the same prompt. ``ref`` is full's continuation (its length N is the number of positions
scored); a policy output that is shorter than ``ref`` counts as wrong at the missing positions.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence

import torch


def first_divergence(ref: Sequence[int], out: Sequence[int]) -> int | None:
    """Index of the first position where ``out`` differs from ``ref`` (or ends early); ``None`` if equal."""
    for i, tok in enumerate(ref):
        if i >= len(out) or out[i] != tok:
            return i
    return None if len(out) == len(ref) else len(ref)


def token_match(ref: Sequence[int], out: Sequence[int]) -> float:
    """Fraction of ``ref``'s positions where ``out`` has the same token."""
    if not ref:
        return 1.0 if not out else 0.0
    return sum(1 for a, b in zip(ref, out) if a == b) / len(ref)


def prefix_match(ref: Sequence[int], out: Sequence[int]) -> float:
    """Tokens before the first divergence, divided by ``len(ref)``."""
    if not ref:
        return 1.0 if not out else 0.0
    div = first_divergence(ref, out)
    return 1.0 if div is None else min(div, len(ref)) / len(ref)


def kl_per_position(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) for each row of two ``[N, vocab]`` logit tensors, in nats (float64)."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref_logits.shape)} vs {tuple(logits.shape)}")
    log_p = torch.log_softmax(ref_logits.double(), dim=-1)
    log_q = torch.log_softmax(logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl.clamp_min(0.0)  # rounding can give -1e-17 for identical rows


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref || P) (nats)."""
    return float(kl_per_position(ref_logits, logits).mean())


def rss_bytes() -> int:
    """Resident set size of this process now (Linux ``/proc/self/statm``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # pragma: no cover - non-Linux fallback
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
