"""``kvbound bench``: registered from :mod:`kvbound.bench.cli`; a broken bench never breaks the other commands."""

from __future__ import annotations

import argparse

from ..errors import KVBoundError
from . import common


def add(sub) -> None:
    """Register ``bench``; if the bench cannot be imported or set up, ``bench`` reports why in one line."""
    try:
        from ..bench import cli as bench_cli

        bench_cli.add_arguments(common.Parser(prog="kvbound bench"))  # dry run: a failure leaves no half parser
        bench = sub.add_parser("bench", help="hold every policy to the same test: token match, memory, speed",
                               description=(bench_cli.__doc__ or "").strip() or None,
                               formatter_class=common.FORMATTER)
        bench_cli.add_arguments(bench)
        bench.set_defaults(func=bench_cli.run)
    except Exception as exc:  # noqa: BLE001 -- report it when 'bench' is actually used
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        stub = sub.add_parser("bench", help=f"(unavailable: {reason})")
        stub.add_argument("rest", nargs=argparse.REMAINDER)

        def unavailable(_args) -> int:
            raise KVBoundError(f"kvbound bench is unavailable in this install: {reason}")

        stub.set_defaults(func=unavailable)
