"""Storage formats of the kept entries, found by name in a registry.

``KVCache(model, method, quantize="kivi-4")`` stores every kept entry in the format registered as ``"kivi-4"``;
:func:`register_storage` adds a name (a format with its parameters), :func:`register_format` a format class (what a
saved cache records and rebuilds). The payload protocol a format implements is described in
:mod:`modalkv.storage.base`.
"""

from __future__ import annotations

import copy
from typing import Callable

from .base import Payload, StorageFormat
from .dense import Dense, DensePayload
from .kivi import KIVI, KIVIPayload
from .spherical import SphericalPayload, SphericalStorage

DENSE = Dense()

_NAMED: dict[str, Callable[[], StorageFormat]] = {}
_FORMATS: dict[str, type[StorageFormat]] = {}


def register_storage(name: str, factory: Callable[[], StorageFormat]) -> None:
    """Make ``quantize=name`` build ``factory()`` (a :class:`StorageFormat`)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a storage name must be a non-empty string, got {name!r}")
    _NAMED[name.lower()] = factory


def register_format(cls: type[StorageFormat]) -> type[StorageFormat]:
    """Register a format class under its ``name`` (a saved cache is rebuilt through it); usable as a decorator."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    _FORMATS[cls.name] = cls
    return cls


def storage_names() -> tuple[str, ...]:
    """The names ``quantize=`` accepts."""
    return tuple(_NAMED)


def make_storage(spec) -> StorageFormat | None:
    """None, a registered name (``"kivi-4"``) or a :class:`StorageFormat` instance (copied) -> a format or None."""
    if spec is None:
        return None
    if isinstance(spec, StorageFormat):
        return copy.deepcopy(spec)
    if isinstance(spec, str):
        factory = _NAMED.get(spec.lower())
        if factory is not None:
            return factory()
    raise ValueError(f"unknown quantizer {spec!r}: the registered storage formats are {', '.join(_NAMED)} "
                     "(or pass a StorageFormat instance such as KIVI(bits=4))")


def format_from_saved(name: str, params: dict) -> StorageFormat:
    """The format a saved cache names, with its saved parameters."""
    cls = _FORMATS.get(name)
    if cls is None:
        raise ValueError(f"unknown storage format {name!r} in a saved cache; registered: {', '.join(_FORMATS)}")
    return cls(**params)


register_format(KIVI)
for _bits in (2, 4, 8):
    register_storage(f"kivi-{_bits}", lambda bits=_bits: KIVI(bits=bits))

__all__ = [
    "DENSE", "Dense", "DensePayload", "KIVI", "KIVIPayload", "Payload", "SphericalPayload", "SphericalStorage",
    "StorageFormat", "format_from_saved", "make_storage", "register_format", "register_storage", "storage_names",
]
