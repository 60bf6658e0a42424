"""``results.json``: written atomically after every record, so Ctrl-C never loses finished runs.

Layout::

    {"scenario": str, "meta": {...}, "runs": [record, ...], "turns": [record, ...], "extra": {...}}

``runs`` holds one record per (policy, budget, prompt) in ``budget-sweep``; per policy in
``multiturn`` (whose per-turn records go to ``turns``); per policy in ``bytes``; per
(tokens, batch) cell in ``latency``. Every run record has ``status`` = ``ok`` | ``skipped`` |
``error`` and, unless ``ok``, a one-line ``reason``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..errors import KVBoundError

RESULTS = "results.json"
SCHEMA_VERSION = 1


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file and an atomic rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class Results:
    """The bench's output, saved to ``out_dir/results.json`` on every change."""

    def __init__(self, out_dir: str | Path, scenario: str, meta: dict[str, Any]) -> None:
        self.dir = Path(out_dir).expanduser()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise KVBoundError(f"cannot create output directory {self.dir}: {exc.strerror}") from None
        self.path = self.dir / RESULTS
        self.data: dict[str, Any] = {"schema": SCHEMA_VERSION, "scenario": scenario, "meta": meta,
                                     "runs": [], "turns": [], "extra": {}}
        self.save()

    @property
    def runs(self) -> list[dict[str, Any]]:
        return self.data["runs"]

    @property
    def turns(self) -> list[dict[str, Any]]:
        return self.data["turns"]

    def add_run(self, record: dict[str, Any]) -> None:
        self.runs.append(record)
        self.save()

    def add_turn(self, record: dict[str, Any]) -> None:
        self.turns.append(record)
        self.save()

    def set_extra(self, key: str, value: Any) -> None:
        self.data["extra"][key] = value
        self.save()

    def finish(self, interrupted: bool) -> None:
        self.data["meta"]["finished"] = _now()
        self.data["meta"]["hardware"]["load_average_end"] = _loadavg()
        self.data["meta"]["interrupted"] = interrupted
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.data)


def load_results(out_dir: str | Path) -> dict[str, Any]:
    path = Path(out_dir).expanduser() / RESULTS
    if not path.is_file():
        raise KVBoundError(f"no {RESULTS} in {path.parent}; run `kvbound bench --out {path.parent}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise KVBoundError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not {"scenario", "meta", "runs"} <= set(data):
        raise KVBoundError(f"{path} is not a kvbound bench results file (needs scenario, meta, runs)")
    data.setdefault("turns", [])
    data.setdefault("extra", {})
    return data


# --------------------------------------------------------------------------- meta


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other processes competing for the CPU skew timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def hardware(device: str = "cpu") -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.node(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "load_average_start": _loadavg(),
    }
    try:
        with open("/proc/meminfo") as fh:
            info["memory_bytes"] = int(fh.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return info


def versions() -> dict[str, str]:
    import transformers

    import kvbound

    return {"kvbound": kvbound.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def describe_model(model_name: str, model) -> dict[str, Any]:
    """Name, architecture, size and dtype of ``model`` (only the name when ``model`` is ``None``)."""
    cfg = model.config.get_text_config(decoder=True) if model is not None else None
    model_info: dict[str, Any] = {"name": model_name}
    if cfg is not None:
        model_info.update(
            model_type=cfg.model_type, dtype=str(model.dtype).removeprefix("torch."),
            layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
            attention_heads=cfg.num_attention_heads,
            kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            parameters=sum(p.numel() for p in model.parameters()),
        )
    return model_info


def commit() -> str | None:
    """The git commit of the kvbound source that runs (``+dirty`` with uncommitted changes), or
    ``None`` outside a git checkout (an installed wheel)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "."],
                               cwd=here.parent, capture_output=True, text=True, timeout=10)
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def program(argv0: str) -> str:
    """The command's name as a user types it: ``kvbound`` for the entry point and for
    ``python3 -m kvbound.cli`` (whose ``argv[0]`` is the package's ``__main__.py``)."""
    name = Path(argv0).name
    return "kvbound" if name == "__main__.py" and Path(argv0).parent.name == "cli" else name


def make_meta(model_name: str, model, argv: list[str] | None, options: dict[str, Any], device: str) -> dict[str, Any]:
    """Provenance of a run: date (UTC), command, commit, model, versions, machine and load, options."""
    return {
        "date": _now(),
        "command": " ".join(argv if argv is not None else [program(sys.argv[0]), *sys.argv[1:]]),
        "commit": commit(),
        "model": describe_model(model_name, model),
        "versions": versions(),
        "hardware": hardware(device),
        "options": options,
    }
