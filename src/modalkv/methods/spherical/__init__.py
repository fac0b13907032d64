"""Spherical KV (Chauhan et al., arXiv 2605.18856 v2): keys as radius + direction codes, attention logits from the
codes, and rate-distortion retention under a byte budget.

* :mod:`.codes` -- the precision tiers, bit packing, direction encoding, (re)encoding a store into tiers;
* :mod:`.codebooks` -- spherical k-means, :func:`fit_codebooks`, and :func:`calibrate`, the explicit calibration on
  the model's own keys (remembered per model);
* :mod:`.rdr` -- the distortion proxies and the allocators (greedy, joint over layers);
* :mod:`.method` -- :class:`SphericalKV`, the method registered as ``"sphericalkv"``.
"""

from ...storage.spherical import SORTS_LAST, SphericalStorage
from .codebooks import CALIBRATED, Codebooks, calibrate, calibration_ids, fit_codebooks, spherical_kmeans
from .codes import (PRESETS, code_bytes, directions, encode_directions, encode_store, pack_codes, parse_tiers,
                    rope_pairs, unpack_codes)
from .method import DEFAULTS, PAPER_PRESET, SphericalKV
from .rdr import (ETA, LAMBDA_R, LAMBDA_THETA, RADIUS_BITS, allocate_jointly, greedy_allocate, head_proxies,
                  paper_decode_distortion, paper_prefill_distortion)

__all__ = [
    "SORTS_LAST", "CALIBRATED", "Codebooks", "DEFAULTS", "ETA", "LAMBDA_R", "LAMBDA_THETA", "PAPER_PRESET", "PRESETS", "RADIUS_BITS",
    "SphericalKV", "SphericalStorage", "allocate_jointly", "calibrate", "calibration_ids", "code_bytes", "directions",
    "encode_directions", "encode_store", "fit_codebooks", "greedy_allocate", "head_proxies", "pack_codes",
    "paper_decode_distortion", "paper_prefill_distortion", "parse_tiers", "rope_pairs", "spherical_kmeans",
    "unpack_codes",
]
