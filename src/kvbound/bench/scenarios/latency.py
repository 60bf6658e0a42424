"""``latency``: one layer's cached K/V read (copied) against recomputed from its stored residuals,
per (cached tokens, batch): where recomputing beats reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ...cache.model_info import kv_bytes_per_token, text_config
from ..render import fmt, meta_section, mib, ok_runs, problems, pyplot, table, times
from ..runner import Bench, Context, positive_ints

DEFAULT_LENGTHS = "128,512,1024,4096"
DEFAULT_BATCHES = "1,8,64"

SUMMARY = "one layer's K/V read vs recomputed from its residuals, by length and batch"


def add_arguments(group) -> None:
    group.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                       help=f"latency: batch sizes (default: {DEFAULT_BATCHES})")


def options(args) -> dict[str, Any]:
    return {"lengths": positive_ints(args.lengths or DEFAULT_LENGTHS, "lengths"),
            "batch_sizes": positive_ints(args.batch_sizes, "batch-sizes")}


def run(ctx: Context) -> None:
    latency(ctx.bench, ctx.options["lengths"], ctx.options["batch_sizes"])


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = _plots(data, out)
    return _markdown(data, plots), plots


def latency(bench: Bench, lengths: list[int], batches: list[int], layer: int | None = None,
            max_bytes: int = 2 << 30, min_run_time: float = 0.2) -> None:
    """Per (cached tokens N, batch B): time *reading* one layer's cached K/V (copying both tensors
    out of the cache) against *recomputing* them from that layer's stored pre-norm residuals with
    :meth:`LayerDriver.project_kv` (norm, k/v projection, k_norm, RoPE). ``recompute_over_read`` < 1
    means recomputing is faster. Cells whose tensors would exceed ``max_bytes`` are skipped."""
    from torch.utils.benchmark import Timer

    from ...recompute import LayerDriver

    driver = LayerDriver(bench.model)
    cfg = text_config(bench.model)
    layer = cfg.num_hidden_layers // 2 if layer is None else layer
    dtype, device = bench.model.dtype, bench.device
    itemsize = torch.empty((), dtype=dtype).element_size()
    kv_per_token = kv_bytes_per_token(bench.model) // cfg.num_hidden_layers
    bench.results.set_extra("latency_layer", layer)
    cells = [(n, b) for n in lengths for b in batches]
    bar = bench.bar(len(cells), "latency")
    try:
        for n, b in cells:
            bar.set_postfix_str(f"N={n} B={b}")
            residual_bytes = b * n * cfg.hidden_size * itemsize
            kv_bytes = b * n * kv_per_token
            record: dict[str, Any] = {"tokens": n, "batch": b, "layer": layer, "kv_bytes": kv_bytes,
                                      "residual_bytes": residual_bytes, "status": "ok"}
            if residual_bytes + 3 * kv_bytes > max_bytes:
                record.update(status="skipped", reason=f"needs ~{(residual_bytes + 3 * kv_bytes) / 2**20:.0f} MiB "
                                                       f"of tensors (limit {max_bytes / 2**20:.0f} MiB)")
            else:
                record.update(_time_cell(driver, layer, n, b, cfg.hidden_size, dtype, device, Timer, min_run_time))
            bench.save_run(record)
            bar.update()
    finally:
        bar.close()


@torch.no_grad()
def _time_cell(driver, layer: int, n: int, b: int, hidden: int, dtype, device, Timer, min_run_time: float):
    gen = torch.Generator().manual_seed(n * 1000 + b)
    residual = torch.randn(b, n, hidden, generator=gen).to(device=device, dtype=dtype)
    positions = torch.arange(n, device=device).unsqueeze(0).expand(b, n)
    keys, values = driver.project_kv(layer, residual, positions)
    keys, values = keys.contiguous(), values.contiguous()
    env = {"driver": driver, "layer": layer, "residual": residual, "positions": positions,
           "keys": keys, "values": values, "torch": torch}
    with torch.no_grad():
        read = Timer("keys.clone(); values.clone()", globals=env).blocked_autorange(min_run_time=min_run_time)
        recompute = Timer("driver.project_kv(layer, residual, positions)", globals=env).blocked_autorange(
            min_run_time=min_run_time)
    del keys, values, residual
    return {"read_seconds": read.median, "recompute_seconds": recompute.median,
            "recompute_over_read": recompute.median / read.median}


def _markdown(data: dict[str, Any], plots: list[str]) -> str:
    layer = data["extra"].get("latency_layer", "?")
    rows = [[r["tokens"], r["batch"], mib(r["kv_bytes"]), mib(r["residual_bytes"]),
             fmt(r["read_seconds"] * 1000, 3), fmt(r["recompute_seconds"] * 1000, 3), times(r["recompute_over_read"])]
            for r in ok_runs(data["runs"])]
    text = [
        f"# kvbound bench: read vs recompute latency\n\n{meta_section(data)}",
        f"\nOne layer (index {layer}). **read** = copying the layer's cached K and V tensors (every byte read once "
        "and written once); **recompute** = `LayerDriver.project_kv` from the layer's stored pre-norm residuals "
        "(RMSNorm, k/v projection, k_norm if any, RoPE). Median of `torch.utils.benchmark` blocks. "
        "`recompute ÷ read` < 1 means recomputing is faster than reading.\n",
        table(["cached tokens", "batch", "K/V MiB", "residual MiB", "read ms", "recompute ms", "recompute ÷ read"], rows),
        problems(data["runs"], ["tokens", "batch"]),
        "\n## Plots\n\n" + "\n".join(f"![{p}]({p})" for p in plots),
    ]
    return "\n".join(text) + "\n"


def _plots(data: dict[str, Any], out: Path) -> list[str]:
    ok = ok_runs(data["runs"])
    if not ok:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for b in sorted({r["batch"] for r in ok}):
        pts = sorted((r["tokens"], r["recompute_over_read"]) for r in ok if r["batch"] == b)
        ax.plot(*zip(*pts), marker="o", label=f"batch {b}")
    ax.axhline(1.0, color="black", linestyle=":", label="recompute = read")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("cached tokens per sequence")
    ax.set_ylabel("recompute time ÷ read time")
    hw = data["meta"].get("hardware", {})
    where = hw.get("cuda_device") if hw.get("device", "cpu") != "cpu" else f"{hw.get('cpu', '?')} x{hw.get('torch_threads', '?')} threads"
    ax.set_title(f"One layer's K/V: recompute vs read -- {data['meta'].get('model', {}).get('name', '?')}\n{where}",
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    plt.close(fig)
    return ["latency.png"]


