"""Micro-benchmark: ways to attend over quantized K/V with PyTorch ops on this CPU (one decode query).

* kivi int4 (SmolLM2's shapes: 3 KV heads x 3 query heads each, head_dim 64, 1920 quantized tokens):
  ``dequantize`` (what kvbound does: decode into float K/V, then fused attention) against ``folded``
  (scales folded into attention: scores from the float codes and per-block scaled queries, values
  weighted per group -- no scaled float copy of K/V);
* int8 per-token records (``offload codec=int8``, 7500 tokens): the scores ``q @ K^T`` from fp32 K,
  from dequantized int8 K, and from torch's int8 weight-only matmul (``torch._weight_int8pack_mm``).

Prints microseconds per call (median of rounds) and the largest difference to the reference.

    python3 benchmarks/quantized_attention_variants.py
"""

import statistics
import time
from dataclasses import replace

import torch

from kvbound.attention import block_attention
from kvbound.cache.codec import int_codec, unpack_into


def timed(fn, rounds: int = 15, reps: int = 20) -> float:
    fn()
    samples = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - t) / reps)
    return statistics.median(samples) * 1e6


def kivi_variants() -> None:
    b, hkv, groups, n, d = 1, 3, 3, 1920, 64
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    codec = int_codec(4, d, None, "bench")
    qk, qv = codec.encode(k, "channel"), replace(codec, clip=True).encode(v, "token")
    q = torch.randn(b, hkv * groups, 1, d, generator=gen)
    scaling = d ** -0.5

    def dequantize():
        kk, vv = torch.empty(b, hkv, n, d), torch.empty(b, hkv, n, d)
        qk.decode(torch.float32, out=kk)
        qv.decode(torch.float32, out=vv)
        return block_attention(q, kk, vv, None, scaling)

    def folded():
        g, blocks = qk.group, n // qk.group
        ck = unpack_into(qk.data, 4, torch.empty(b, hkv, n, d))
        qq = q.view(b, hkv, groups, d)
        qs = qq.unsqueeze(2) * qk.scale.float().unsqueeze(3)  # [B, Hkv, blocks, G, D]
        logits = torch.matmul(ck.view(b, hkv, blocks, g, d), qs.transpose(-1, -2))  # [B, Hkv, blocks, g, G]
        bias = torch.matmul(qk.zero.float(), qq.transpose(-1, -2))  # [B, Hkv, blocks, G]
        logits = (logits + bias.unsqueeze(3)).view(b, hkv, n, groups).mul_(scaling)
        lse = torch.logsumexp(logits, dim=2)
        p = torch.exp(logits - lse.unsqueeze(2))  # [B, Hkv, n, G]
        cv = unpack_into(qv.data, 4, torch.empty(b, hkv, n, d))
        gv, ng = qv.group, d // qv.group
        w = p.unsqueeze(2) * qv.scale.float().transpose(-1, -2).unsqueeze(-1)  # [B, Hkv, ng, n, G]
        out = torch.matmul(w.transpose(-1, -2), cv.view(b, hkv, n, ng, gv).transpose(2, 3))  # [B, Hkv, ng, G, gv]
        out = out + torch.matmul(p.transpose(-1, -2), qv.zero.float()).transpose(-1, -2).unsqueeze(-1)
        return out.permute(0, 1, 3, 2, 4).reshape(b, hkv * groups, 1, d), lse.view(b, hkv * groups, 1)

    (o1, _), (o2, _) = dequantize(), folded()
    print(f"kivi int4, {n} tokens: dequantize {timed(dequantize):7.0f} us, folded {timed(folded):7.0f} us "
          f"(max |diff| {(o1 - o2).abs().max().item():.1e})")


def int8_scores() -> None:
    n, d, groups = 7500, 64, 3
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(groups, d, generator=gen)
    codes = torch.randint(-128, 127, (n, d), dtype=torch.int8, generator=gen)
    scale = torch.rand(n, generator=gen)
    keys = codes.float() * scale[:, None]
    ref = q @ keys.T
    packed = torch._weight_int8pack_mm(q, codes, scale)
    print(f"int8 scores, {groups}x{d} by {n}x{d}: fp32 matmul {timed(lambda: q @ keys.T):7.0f} us, "
          f"dequantize + matmul {timed(lambda: q @ (codes.float() * scale[:, None]).T):7.0f} us, "
          f"_weight_int8pack_mm {timed(lambda: torch._weight_int8pack_mm(q, codes, scale)):7.0f} us "
          f"(max |diff| {(packed - ref).abs().max().item():.1e})")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread")
    kivi_variants()
    int8_scores()
