"""Reading prompt text from files (shared by the CLI and the bench)."""

from __future__ import annotations

from pathlib import Path

from .errors import KVBoundError


def read_prompt_file(path: str | Path) -> str:
    """The UTF-8 text of ``path``; a clear :class:`KVBoundError` if it is missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise KVBoundError(f"prompt file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KVBoundError(f"cannot read prompt file {path} as UTF-8 text: {exc}") from None
    if not text.strip():
        raise KVBoundError(f"prompt file {path} is empty")
    return text
