"""kvbound's C kernel against dequantize + PyTorch's attention, by query rows per KV head: where
``kvbound.kernels.MAX_ROWS`` comes from. One layer of SmolLM2's shapes (3 KV heads, head_dim 64, int8
records of 4,096 tokens, one scale per token), random K/V; median of repeated calls, one thread. The
first row also times PyTorch's attention over the same K/V in float32 (what an fp32 store reads).

    python3 benchmarks/kernel_rows.py [repeats]
"""

import statistics
import sys
import time

import torch

from kvbound import attention, kernels
from kvbound.cache.codec import parse_codec


def ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kv_heads, groups, d, n = 3, 3, 64, 4096
    k, v = torch.randn(1, kv_heads, n, d), torch.randn(1, kv_heads, n, d)
    codec = parse_codec("int8", d)
    kr, vr = codec.to_bytes(k), codec.to_bytes(v)
    ck, cv = (kernels.Coded.records(x, 8, codec.group, d) for x in (kr, vr))
    buf = torch.empty(2, 1, kv_heads, n, d)

    def decoded(q):
        return attention.block_attention(q, codec.from_bytes(kr, torch.float32, out=buf[0]),
                                         codec.from_bytes(vr, torch.float32, out=buf[1]), None, 0.125)

    print(f"kernel available: {kernels.available()}; MAX_ROWS = {kernels.MAX_ROWS}")
    print("rows/KV head | dequantize + attention (ms) | kernel (ms) | kernel / dequantize")
    for t in (1, 2, 4, 8, 16):
        q = torch.randn(1, kv_heads * groups, t, d)
        a = ms(lambda: decoded(q), repeats)
        b = ms(lambda: kernels.coded_attention(q, ck, cv, 8, 0.125), repeats)
        print(f"{groups * t:12d} | {a:27.2f} | {b:11.2f} | {b / a:.2f}")
    q = torch.randn(1, kv_heads * groups, 1, d)
    print(f"float32 K/V, PyTorch's attention, 3 rows: {ms(lambda: attention.block_attention(q, k, v, None, 0.125), repeats):.2f} ms")


if __name__ == "__main__":
    main()
