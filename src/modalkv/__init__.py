"""modalkv: modality-aware KV-cache compression for transformers that really frees memory."""

from .cache import KVCache, cache_kwargs
from .context import prefill
from .methods import available_methods, make_method
from .models import DEFAULT_MODEL, load_model
from .saved import load_cache, save_cache

__version__ = "0.1.0"
__all__ = ["KVCache", "cache_kwargs", "prefill", "available_methods", "make_method", "load_model", "save_cache",
           "load_cache", "DEFAULT_MODEL", "__version__"]
