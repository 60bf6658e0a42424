"""Merge the ``results.json`` of several ``kvbound bench`` runs of one scenario into one folder and
render its report (used when a long sweep was split over parallel processes on a shared machine).

    python3 benchmarks/merge_bench_runs.py OUT_DIR RUN_DIR [RUN_DIR ...]

Runs are taken in order; a ``full`` (reference) record that repeats an earlier one's cell
(same scenario keys) is dropped, so the reference counts once. ``meta`` is the first run's, with
every run's command listed under ``meta.merged_from``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from kvbound.bench import report
from kvbound.bench.results import RESULTS, load_results, write_json_atomic

CELL_KEYS = ("kind", "length", "depth", "prompt")


def merge(out: Path, sources: list[Path]) -> list[Path]:
    datas = [load_results(s) for s in sources]
    if len({d["scenario"] for d in datas}) != 1:
        raise SystemExit("all runs must be of the same scenario")
    merged = dict(datas[0])
    merged["meta"] = dict(datas[0]["meta"], merged_from=[d["meta"].get("command") for d in datas])
    seen, runs = set(), []
    for d in datas:
        for r in d["runs"]:
            key = (r.get("policy"), r.get("budget"), *(r.get(k) for k in CELL_KEYS))
            if key in seen and r.get("policy") == "full":
                continue
            seen.add(key)
            runs.append(r)
    merged["runs"] = runs
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / RESULTS, merged)
    return report.render(out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    for path in merge(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]]):
        print(path)
