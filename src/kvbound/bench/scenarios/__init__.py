"""The scenario registry of ``kvbound bench``: scenario name -> module in this package.

Adding a scenario is one module here and one line in :data:`SCENARIOS` (see the contract in
:mod:`kvbound.bench`). Modules are imported on first use, so a scenario's heavy imports cost
nothing to the others.
"""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from ...errors import KVBoundError

SCENARIOS: dict[str, str] = {  # name (what results.json stores as "scenario") -> module in this package
    "budget-sweep": "budget_sweep",
    "multiturn": "multiturn",
    "bytes": "bytes_per_token",
    "latency": "latency",
    "perplexity": "perplexity",
    "needle": "needle",
    "long": "long_context",
    "decode": "decode",
    "quantization": "quantization",
    "prefill": "prefill",
    "recompute-error": "recompute_error",
    "kernel-rows": "kernel_rows",
    "serve-parking": "serve_parking",
    "serve-load": "serve_load",
    "allocation": "allocation",
    "cluster": "cluster",
    "ruler": "ruler",
}


def names() -> list[str]:
    return list(SCENARIOS)


def get(name: str) -> ModuleType:
    """The module of scenario ``name`` (one-line error for an unknown one)."""
    if name not in SCENARIOS:
        raise KVBoundError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    return import_module(f"{__name__}.{SCENARIOS[name]}")


def summary(name: str) -> str:
    """The scenario's one-line ``SUMMARY`` (``--help``)."""
    return get(name).SUMMARY
