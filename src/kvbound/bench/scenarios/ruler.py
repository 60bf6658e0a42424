"""``ruler``: RULER's synthetic tasks (Hsieh et al. 2024, https://arxiv.org/abs/2404.06654) at the field's
compression ratios, under two protocols: ``compress`` (kvpress's: the context is prefilled once, each
policy compresses its own copy, then the question is asked) and ``bounded`` (the policy holds its budget
from the first prefill chunk). The measurement is :mod:`kvbound.bench.ruler`, the page
:mod:`kvbound.bench.ruler_report`; this module plugs them into the scenario registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import ruler
from ..ruler_report import ruler_md, ruler_plots
from ..runner import Context

# kvpress's leaderboards run their models in bfloat16; on a CPU with AVX512-BF16 it also shortens the shared
# 4k prefill (27 vs 43 s on Qwen2.5-0.5B here; docs/ruler.md); --dtype float32 for float32
DEFAULT_DTYPE = "bfloat16"

SUMMARY = "RULER tasks at compression ratios 0.25-0.875, compress or bounded protocol: score per method x ratio"


def add_arguments(group) -> None:
    ruler.add_arguments(group)


def options(args) -> dict[str, Any]:
    policies = args.policy_list if args.policies else ruler.default_policies()
    return ruler.options(args, policies)


def run(ctx: Context) -> None:
    policies = ctx.options["policies"]
    ruler.options(ctx.args, policies, ctx.bench.model)  # the lengths against the model's positions
    ruler.run(ctx.bench, ctx.options)


def render(data: dict[str, Any], out: Path) -> tuple[str, list[str]]:
    plots = ruler_plots(data, out)
    return ruler_md(data, plots), plots
