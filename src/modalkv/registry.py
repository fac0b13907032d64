"""Method names -> method classes.

The cache resolves a method name here, so the core never imports the methods: :mod:`modalkv.methods` registers every
method it defines when it is imported (importing :mod:`modalkv` does so), and a method defined elsewhere is added
with :func:`register_method`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Protocol, runtime_checkable

#: name -> method class, in registration order (``modalkv.methods.REGISTRY`` is this dict)
METHODS: dict[str, type] = {}


@runtime_checkable
class MethodLike(Protocol):
    """What makes an object a method for the cache (every :class:`~modalkv.methods.base.Method` is one)."""

    name: str

    def prefill(self, ctx: Any) -> Any: ...
    def decode(self, step: Any) -> None: ...
    def setup(self, cache: Any) -> None: ...


def register_method(cls: type) -> type:
    """Add a method class to the registry under its class attribute ``name`` (usable as a decorator)."""
    if not getattr(cls, "name", ""):
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    METHODS[cls.name] = cls
    return cls


def available_methods() -> dict[str, str]:
    """Method name -> one-line summary."""
    return {name: cls.summary for name, cls in METHODS.items()}


def make_method(method, **params):
    """A method instance from a registry name (with parameters) or a copy of an instance."""
    if isinstance(method, MethodLike) and not isinstance(method, type):
        if params:
            raise TypeError("pass method parameters either in the method instance or as keywords, not both")
        return copy.deepcopy(method)
    if not isinstance(method, str):
        raise TypeError(f"method must be a name or a Method instance, got {type(method).__name__}")
    cls = METHODS.get(method.lower())
    if cls is None:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - fields)
    if unknown:
        raise TypeError(
            f"{cls.__name__} has no parameter(s) {', '.join(unknown)}; its parameters: {', '.join(sorted(fields)) or 'none'}"
        )
    return cls(**params)
