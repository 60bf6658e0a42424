"""kvbound: keep a transformer's KV cache inside a memory budget, exactly where it matters."""

from .cache import KVBoundCache, make_cache, policies
from .errors import KVBoundError

__version__ = "0.1.0"
__all__ = ["KVBoundCache", "KVBoundError", "make_cache", "policies", "__version__"]
