"""``kvbound bench``: every policy held to the same test (agreement with ``full``, memory per tier,
multi-turn, speed), written to results.json, report.md and PNG plots."""

from .cli import add_arguments, run
from .report import render

__all__ = ["add_arguments", "render", "run"]
