"""``kvbound serve``: an OpenAI-compatible chat server over kvbound caches.

Each conversation owns one cache under the chosen policy; a request continues the stored
conversation whose last prompt is the longest prefix of its tokens (:mod:`.radix`). Under a
global ``memory_budget`` the least recently used idle conversations are *parked*: their cache is
freed and only their token ids (4 bytes per token) are kept; the next request restores them by a
chunked prefill, exactly (:mod:`.store`). One worker thread runs every model call (:mod:`.worker`);
the HTTP side is FastAPI (:mod:`.app`), which is an optional extra: ``pip install kvbound[serve]``.
"""

from .config import ServeConfig, parse_size

__all__ = ["ServeConfig", "parse_size", "create_app"]


def create_app(config: ServeConfig, model=None, tokenizer=None):
    """The FastAPI application (imported lazily: FastAPI is the optional ``serve`` extra)."""
    from .app import create_app as _create

    return _create(config, model=model, tokenizer=tokenizer)
