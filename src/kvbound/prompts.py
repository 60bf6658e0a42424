"""Reading prompt text from files (shared by the CLI and the bench)."""

from __future__ import annotations

from pathlib import Path

from .errors import KVBoundError

_SNIFF = 8192  # bytes looked at to tell text from binary


def looks_binary(data: bytes) -> bool:
    """True for data that is not text: a NUL byte, or many control characters, in its first 8 KiB."""
    head = data[:_SNIFF]
    if b"\x00" in head:
        return True
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 12, 13))
    return bool(head) and control / len(head) > 0.1


def read_prompt_file(path: str | Path, what: str = "prompt file") -> str:
    """The UTF-8 text of ``path``; a clear :class:`KVBoundError` if it is missing, unreadable,
    binary or empty (``what`` names the file in the message, e.g. ``"text file"``)."""
    path = Path(path)
    if not path.is_file():
        raise KVBoundError(f"{what} {path} does not exist")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KVBoundError(f"cannot read {what} {path}: {exc.strerror}") from None
    if looks_binary(data):
        raise KVBoundError(f"{what} {path} looks binary (NUL or control bytes); give a UTF-8 text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KVBoundError(f"cannot read {what} {path} as UTF-8 text: {exc}") from None
    if not text.strip():
        raise KVBoundError(f"{what} {path} is empty")
    return text
