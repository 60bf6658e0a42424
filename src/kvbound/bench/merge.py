"""``kvbound bench merge RUN_DIR [RUN_DIR ...] --out DIR``: the ``results.json`` of several runs of
one scenario in one folder, with its report (a long sweep split over parallel processes on a shared
machine, or runs with different prefill chunks).

Runs are taken in order; a record that repeats an earlier one's cell (same policy, budget and
scenario keys; e.g. the ``full`` reference every run measures) is dropped, so each cell counts once
(a re-run of a few cells goes first to replace them). In a ``long`` merge every run is compared
again with the kept ``full`` of its length. ``meta`` is the first run's, with
every run's command, dates and load averages listed under ``meta.merged_from`` and list-valued
options (lengths, kinds, policies, ...) the union over the runs.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import KVBoundError
from . import report
from .results import RESULTS, load_results, write_json_atomic

CELL_KEYS = ("model", "kind", "length", "tokens", "chunk", "depth", "prompt",  # "tokens", "chunk": the long scenario
             "protocol", "task", "sample", "ratio", "role")  # the ruler scenario


def _source(data: dict) -> dict:
    """What the merged report lists for one source run: its command, dates and load averages."""
    meta, hw = data["meta"], data["meta"].get("hardware", {})
    return {"command": meta.get("command"), "date": meta.get("date"), "finished": meta.get("finished"),
            "load_average_start": hw.get("load_average_start"), "load_average_end": hw.get("load_average_end")}


def _union_options(options: list[dict]) -> dict:
    """The first run's options, with list-valued ones (lengths, depths, kinds, policies, budgets)
    replaced by the union over every run (numbers sorted), so the merged report names every cell it holds."""
    merged = dict(options[0])
    for key, value in options[0].items():
        if isinstance(value, list):
            union = list({json.dumps(x): x for o in options for x in o.get(key, [])}.values())
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in union)
            merged[key] = sorted(union) if numeric else union
    return merged


def merge(out: str | Path, sources: list[str | Path]) -> list[Path]:
    """Merge ``sources`` (run folders or their results.json) into ``out``; returns the written paths."""
    out = Path(out).expanduser()
    datas = [load_results(report.results_dir(s)) for s in sources]
    if len({d["scenario"] for d in datas}) != 1:
        raise KVBoundError("merge: all runs must be of the same scenario, got "
                           + ", ".join(sorted({d["scenario"] for d in datas})))
    merged = dict(datas[0])
    merged["meta"] = dict(datas[0]["meta"], merged_from=[_source(d) for d in datas],
                          options=_union_options([d["meta"].get("options", {}) for d in datas]))
    seen, runs = set(), []
    for d in datas:
        for r in d["runs"]:
            key = (r.get("policy"), r.get("budget"), *(r.get(k) for k in CELL_KEYS))
            if key in seen:
                continue
            seen.add(key)
            runs.append(r)
    if merged["scenario"] == "long":  # ratios and token match against the merged table's own `full`
        from .long import recompare

        runs = recompare(runs)
    merged["runs"] = runs
    extra = dict(datas[0].get("extra", {}))
    for key in extra:  # list-valued extras (the ruler scenario's shared_prefills): every run's
        if isinstance(extra[key], list):
            extra[key] = [x for d in datas for x in d.get("extra", {}).get(key, [])]
    merged["extra"] = extra
    for key, field in (("lengths", "length"), ("depths", "depth"), ("kinds", "kind")):  # the cells actually held
        if key in merged["meta"]["options"]:
            held = [x for x in merged["meta"]["options"][key] if any(r.get(field) == x for r in runs)]
            merged["meta"]["options"][key] = held
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS, merged)
    return report.render(out)

