"""``kernel-rows``: kvbound's C kernel (attention straight over int8 records) against dequantizing
into a float buffer + PyTorch's attention, by query rows per KV head; where
:data:`kvbound.kernels.MAX_ROWS` comes from. One layer of SmolLM2's shapes by default (3 KV heads x 3
query heads each, head_dim 64, 4,096 tokens), random K/V, median of ``--repeats`` calls; the first row
also times PyTorch's attention over float32 K/V (what an fp32 store reads). Loads no model."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..render import fmt, meta_section, ok_runs, problems, table
from ..runner import Context, _failure, positive_ints

NEEDS_MODEL = False
DEFAULT_LENGTHS = "4096"
DEFAULT_ROWS = "1,2,4,8,16"

SUMMARY = "the C kernel vs dequantize + attention by query rows (kernels.MAX_ROWS); no model"


def add_arguments(group) -> None:
    group.add_argument("--rows", default=DEFAULT_ROWS,
                       help=f"kernel-rows: query rows per query head to time (default: {DEFAULT_ROWS})")
    group.add_argument("--repeats", type=int, default=30, help="kernel-rows: timed calls per cell (default: 30)")
    group.add_argument("--shape", default="3,3,64", metavar="KV_HEADS,GROUPS,HEAD_DIM",
                       help="kernel-rows: KV heads, query heads per KV head, head dim (default: 3,3,64 = SmolLM2)")


def options(args) -> dict[str, Any]:
    kv_heads, groups, head_dim = positive_ints(args.shape, "shape")[:3]
    return {"lengths": positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths"),
            "rows": positive_ints(args.rows, "rows"), "repeats": args.repeats, "kv_heads": kv_heads,
            "groups": groups, "head_dim": head_dim}


def _ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def run(ctx: Context) -> None:
    from ... import attention, kernels
    from ...cache.codec import parse_codec

    o = ctx.options
    ctx.results.set_extra("kernel", {"available": kernels.available(), "max_rows": kernels.MAX_ROWS})
    torch.manual_seed(ctx.args.seed)
    bar = ctx.bar(len(o["lengths"]) * len(o["rows"]), "kernel-rows")
    try:
        for n in o["lengths"]:
            hkv, g, d = o["kv_heads"], o["groups"], o["head_dim"]
            k, v = torch.randn(1, hkv, n, d), torch.randn(1, hkv, n, d)
            codec = parse_codec("int8", d)
            kr, vr = codec.to_bytes(k), codec.to_bytes(v)
            buf = torch.empty(2, 1, hkv, n, d)
            scale = d ** -0.5
            for t in o["rows"]:
                q = torch.randn(1, hkv * g, t, d)
                record: dict[str, Any] = {"tokens": n, "rows_per_kv_head": g * t, "status": "ok"}
                try:
                    record["dequantize_ms"] = _ms(lambda: attention.block_attention(
                        q, codec.from_bytes(kr, torch.float32, out=buf[0]),
                        codec.from_bytes(vr, torch.float32, out=buf[1]), None, scale), o["repeats"])
                    if kernels.available():
                        ck, cv = (kernels.Coded.records(x, 8, codec.group, d) for x in (kr, vr))
                        record["kernel_ms"] = _ms(lambda: kernels.coded_attention(q, ck, cv, 8, scale), o["repeats"])
                        record["kernel_over_dequantize"] = record["kernel_ms"] / record["dequantize_ms"]
                    if t == o["rows"][0]:
                        record["fp32_attention_ms"] = _ms(lambda: attention.block_attention(q, k, v, None, scale),
                                                          o["repeats"])
                except Exception as exc:
                    record["status"], record["reason"] = _failure(exc)
                ctx.save_run(record)
                bar.update()
    finally:
        bar.close()


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    kernel = data["extra"].get("kernel", {})
    rows = [[r["tokens"], r["rows_per_kv_head"], fmt(r["dequantize_ms"], 3), fmt(r.get("kernel_ms"), 3),
             fmt(r.get("kernel_over_dequantize"), 2), fmt(r.get("fp32_attention_ms"), 3)] for r in ok_runs(data["runs"])]
    text = [f"# kvbound bench: the C kernel vs dequantize + attention, by query rows\n\n{meta_section(data)}",
            f"\nKernel built: {fmt(kernel.get('available'))}; `kernels.MAX_ROWS` = {kernel.get('max_rows', '?')} at the "
            "time of the run. int8 records, one scale per token; `kernel ÷ dequantize` < 1 means the kernel is faster "
            "(it pays while that holds, up to MAX_ROWS rows per KV head). Median of the timed calls, milliseconds.\n",
            table(["tokens", "query rows / KV head", "dequantize + attention ms", "kernel ms", "kernel ÷ dequantize",
                   "fp32 K/V attention ms"], rows),
            problems(data["runs"], ["tokens", "rows_per_kv_head"])]
    return "\n".join(text) + "\n", []
