"""Quality measures that matter for long contexts: perplexity of a long text and RULER-style
needle retrieval, both scored through a kvbound cache.

``kvbound.quality.perplexity(model, input_ids, cache, chunk=16)`` is the stable entry point (it
imports only torch); the needle tasks live in :mod:`kvbound.quality.needle` and the offline corpus
in :mod:`kvbound.quality.corpus`.
"""

from .perplexity import DEFAULT_CHUNK, PerplexityResult, perplexity

__all__ = ["DEFAULT_CHUNK", "PerplexityResult", "perplexity"]
