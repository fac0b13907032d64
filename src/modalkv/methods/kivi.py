"""KIVI-style quantized storage for the kept entries: composes with any eviction method.

Paper: Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024 (arXiv 2402.02750).
The format lives in :mod:`modalkv.storage.kivi`; this module keeps the names it has always exported.
"""

from __future__ import annotations

from ..storage.kivi import KIVI, KIVIPayload, dequantize, pack_bits as _pack, quantize, unpack_bits as _unpack

__all__ = ["KIVI", "KIVIPayload", "dequantize", "quantize", "_pack", "_unpack"]
