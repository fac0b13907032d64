"""The method registry: one module per method, each a dataclass (see :mod:`modalkv.methods.base`)."""

from __future__ import annotations

import ast

from ..budget import parse_caps
from ..registry import METHODS, available_methods, make_method, register_method
from ..storage import make_storage
from .adakv import AdaKV
from .base import Method, PrefillContext
from .full import Full
from .expected_attention import ExpectedAttention
from .h2o import H2O
from .hae import HAE
from .knorm import KNorm
from .kvzip import KVzip
from .lookm import LookM
from .madakv import MadaKV
from .pyramidkv import PyramidKV
from .retentivekv import RetentiveKV
from .spherical import SphericalKV
from .snapkv import SnapKV
from .streaming import StreamingLLM

#: name -> method class: the registry the cache resolves method names in (:mod:`modalkv.registry`)
REGISTRY: dict[str, type[Method]] = METHODS
for _cls in (Full, StreamingLLM, H2O, SnapKV, PyramidKV, AdaKV, LookM, MadaKV, HAE, RetentiveKV, SphericalKV, KVzip,
             ExpectedAttention, KNorm):
    register_method(_cls)
register = register_method  # the name this package has always exported


def parse_label(label: str) -> tuple[str, dict, dict[str, float]]:
    """A benchmark method label -> (method name, method parameters, per-modality caps).

    ``"snapkv@image=0.1,text=0.5"`` is SnapKV at the cell's budget keeping at most 10 % of the image tokens and 50 %
    of the text tokens; ``"hae(mode=kv_only,tau_g=0.01)"`` is HAE with those parameters (values are Python
    literals; a bare word is a string). Both parts may be combined: ``"hae(tau_g=0.01)@image=0.2"``.
    """
    head, _, caps = label.partition("@")
    name, paren, rest = head.partition("(")
    params: dict = {}
    if paren:
        if not rest.endswith(")"):
            raise ValueError(f"method label {label!r}: write name(param=value,...)")
        for part in filter(None, (p.strip() for p in rest[:-1].split(","))):
            key, eq, value = part.partition("=")
            if not eq or not key.strip().isidentifier():
                raise ValueError(f"method label {label!r}: parameter {part!r} is not param=value")
            try:
                params[key.strip()] = ast.literal_eval(value.strip())
            except (ValueError, SyntaxError):
                params[key.strip()] = value.strip()
    return name.strip(), params, parse_caps(caps)


def make_quantizer(spec):
    """None, a storage name registered in :mod:`modalkv.storage` (``"kivi-2"``, ``"kivi-4"``, ``"kivi-8"``) or a
    :class:`~modalkv.storage.StorageFormat` instance such as ``KIVI(bits=4)`` (see :func:`modalkv.storage.make_storage`)."""
    return make_storage(spec)


__all__ = [
    "REGISTRY", "Method", "PrefillContext", "available_methods", "make_method", "make_quantizer", "register",
    "parse_label",
    "Full", "StreamingLLM", "H2O", "SnapKV", "PyramidKV", "AdaKV", "LookM", "MadaKV", "HAE", "RetentiveKV", "SphericalKV",
    "KVzip", "ExpectedAttention", "KNorm",
]
