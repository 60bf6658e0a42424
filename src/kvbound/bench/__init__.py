"""``kvbound bench``: every policy held to the same test, one scenario at a time, written to
``results.json`` (:mod:`~kvbound.bench.results`), ``report.md`` and PNG plots.

Layout (imports point down this list, never up):

* :mod:`~kvbound.bench.cli` -- the options and the driver: ``kvbound bench --scenario NAME``,
  ``kvbound bench report``, ``kvbound bench merge``;
* :mod:`~kvbound.bench.report` -- renders a results file through its scenario's renderer, or a whole
  results tree into a site folder with an index;
* :mod:`~kvbound.bench.scenarios` -- the registry: scenario name -> module, one module per scenario;
* :mod:`~kvbound.bench.runner` (greedy decode with timings and RSS, per-tier memory, policy variants,
  :class:`~kvbound.bench.runner.Context`) and :mod:`~kvbound.bench.render` (tables, provenance, plot
  styles) -- what the scenario modules share;
* :mod:`~kvbound.bench.results`, :mod:`~kvbound.bench.inputs`, :mod:`~kvbound.bench.metrics`.

**The scenario contract.** A scenario is one module ``kvbound/bench/scenarios/<module>.py`` and one
line ``"<name>": "<module>"`` in :data:`kvbound.bench.scenarios.SCENARIOS`. The module defines:

* a docstring that says what it measures and how, and ``SUMMARY``: one line for ``--help``;
* ``options(args) -> dict``: validate its options (a :class:`~kvbound.errors.KVBoundError` with one line
  on bad input, before anything runs) and return them resolved; they go to ``meta.options``.
  ``args.policy_list`` (policies or variants, ``full`` among them if asked), ``args.budget_list``
  (:class:`~kvbound.bench.inputs.Budget`) and ``args.new_tokens`` are already parsed;
* ``run(ctx: Context) -> None``: measure, appending each record with ``ctx.save_run`` (or
  ``ctx.results.add_turn`` / ``set_extra``) as soon as it exists, so Ctrl-C keeps it. A record has
  ``status`` ``ok`` | ``skipped`` | ``error`` and, unless ok, a one-line ``reason``;
* ``render(data, out: Path) -> (markdown, [plot file names])``: the page of a results.json, reading
  only ``data`` (it must render any committed file of its scenario); plots are written into ``out``
  and linked relatively;
* optionally ``add_arguments(group)`` (options only it uses; shared ones live in ``cli``),
  ``NEEDS_MODEL = False`` (the driver then loads no model: ``ctx.bench`` is ``None``),
  ``DEFAULT_BUDGETS`` and ``DEFAULT_NEW_TOKENS``.

The driver writes ``meta`` (date, command, commit, model, versions, machine, load average at start
and end) and renders the report after the run, also after Ctrl-C.
"""

from .cli import add_arguments, run
from .report import render

__all__ = ["add_arguments", "render", "run"]
