"""Render ``results.json`` into ``report.md`` and PNG plots, through the renderer of the scenario the
file names (``scenarios.get(data["scenario"]).render``), and a whole results tree into a site folder
with an index page.

Everything here reads only the results files, so a finished or interrupted run can be re-rendered
with ``kvbound bench report DIR`` and every committed result regenerated with
``kvbound bench report --all benchmarks/results --out docs/results``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import KVBoundError
from . import scenarios
from .results import RESULTS, load_results

REPORT = "report.md"
PAGE = "index.md"  # a page in a site folder: DOCS/<path of the result>/index.md


def results_dir(path: str | Path) -> Path:
    """The folder of a ``results.json`` given as the file or its folder."""
    path = Path(path).expanduser()
    return path.parent if path.name == RESULTS else path


def render(out_dir: str | Path, dest: str | Path | None = None, page: str = REPORT) -> list[Path]:
    """Write ``page`` (default ``report.md``) and the scenario's plots for ``out_dir/results.json``
    into ``dest`` (default: beside it); return their paths."""
    src = Path(out_dir).expanduser()
    data = load_results(src)
    target = Path(dest).expanduser() if dest is not None else src
    target.mkdir(parents=True, exist_ok=True)
    try:
        module = scenarios.get(data["scenario"])
    except KVBoundError:
        raise KVBoundError(f"{src / RESULTS} has unknown scenario {data['scenario']!r}; known: "
                           f"{', '.join(scenarios.names())}") from None
    markdown, plots = module.render(data, target)
    (target / page).write_text(markdown, encoding="utf-8")
    return [target / page, *(target / p for p in plots)]


def _title(markdown: str) -> str:
    first = markdown.lstrip().splitlines()[0] if markdown.strip() else "?"
    return first.lstrip("#").strip()


def index_rows(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every bench results.json folder under ``root`` (sorted), with its data; a results.json in
    another format (written by a script before the bench had its scenario) is named on stderr and left out."""
    import sys

    found = []
    for path in sorted(root.rglob(RESULTS)):
        try:
            found.append((path.parent, load_results(path.parent)))
        except KVBoundError as exc:
            print(f"kvbound bench report: skipped {exc}", file=sys.stderr)
    return found


def render_all(root: str | Path, out: str | Path | None = None) -> list[Path]:
    """Render every ``results.json`` under ``root``: into ``out/<its path below root>/index.md``
    (with its plots beside it) and an ``out/index.md`` listing them; without ``out``, each
    ``report.md`` beside its results.json."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise KVBoundError(f"--all {root}: not a folder")
    found = index_rows(root)
    if not found:
        raise KVBoundError(f"no {RESULTS} under {root}")
    written: list[Path] = []
    rows = []
    for folder, data in found:
        rel = folder.relative_to(root)
        if out is None:
            paths = render(folder)
        else:
            paths = render(folder, Path(out) / rel, PAGE)
        written += paths
        meta = data["meta"]
        model = meta.get("model", {}).get("name") or ", ".join(meta.get("options", {}).get("models", [])) or "–"
        link = (rel / (PAGE if out is not None else REPORT)).as_posix()
        rows.append(f"| [{rel.as_posix() or '.'}]({link}) | {data['scenario']} | "
                    f"{_title(paths[0].read_text(encoding='utf-8'))} | `{model}` | {str(meta.get('date', '?'))[:10]} |")
    if out is not None:
        index = Path(out) / PAGE
        index.write_text(
            "# Benchmark results\n\nEvery page below is generated from a committed `results.json` under "
            "`benchmarks/results/` by\n\n    kvbound bench report --all benchmarks/results --out docs/results\n\n"
            "(see [Benchmarks](../benchmarks.md)); each page names the command, commit, machine, load and date of "
            "its run.\n\n| result | scenario | title | model | date |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n", encoding="utf-8")
        written.append(index)
    return written
