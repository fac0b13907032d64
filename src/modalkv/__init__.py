"""modalkv: modality-aware KV-cache compression for transformers that really frees memory."""

from .cache import KVCache, cache_kwargs
from .methods import available_methods, make_method
from .models import DEFAULT_MODEL, load_model

__version__ = "0.1.0"
__all__ = ["KVCache", "cache_kwargs", "available_methods", "make_method", "load_model", "DEFAULT_MODEL", "__version__"]
