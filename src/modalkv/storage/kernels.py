"""The fused CPU reads of compressed entries: a small C library (``_kernels.c``) built with the system C compiler.

The library is built on first use into ``$MODALKV_KERNEL_DIR`` or ``~/.cache/modalkv/kernels``, named by a hash of
the source, the flags and the CPU, and loaded with ctypes.
``scripts/install.sh`` builds it once (``python -m modalkv.storage.kernels``). When no compiler is found, the
build fails, or ``MODALKV_KERNELS=0`` is set, :func:`library` returns None and every payload reads with its pure
torch path, which gives the same results up to float rounding (tests/test_storage.py checks both).
``MODALKV_KERNELS=scalar`` loads a build of the portable C loops only (``-DMODALKV_SCALAR``), the path CPUs without
AVX2 take; the tests compare it too.

CHOICE (a C library through ctypes rather than torch.compile or a torch C++ extension): it needs no torch headers
and builds in about a second, so a fresh process never waits on a compiler; torch.compile and a torch C++ extension
were not measured. One call reads every (row, KV head) of a layer, which is also the layout a GPU kernel would take
(see docs/results/decode_core.md).

CHOICE (instruction set chosen at build time, not dispatched at run time): the library is compiled with
``-march=native`` for the CPU it runs on (the cache key includes the CPU's flags, so a copied home directory on
another CPU builds again). On x86 CPUs with AVX2, FMA and F16C the hot loops are the intrinsics paths of
``_kernels.c``; elsewhere the portable C loops, which the compiler vectorises as it can. Runtime dispatch would only
matter for a library built once and shipped to other CPUs, which this one never is.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("_kernels.c")
# reassociation lets gcc vectorise the dot products; not -ffast-math, whose start-up code would switch the whole
# process to flush-to-zero arithmetic
FLAGS = ["-O3", "-march=native", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-fno-math-errno",
         "-fPIC", "-shared", "-fopenmp"]
_LOCK = threading.Lock()
_STATE: dict = {}


def _cpu_id() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


VARIANTS = {"default": [], "scalar": ["-DMODALKV_SCALAR"]}  # MODALKV_KERNELS=scalar: the portable loops only


def _variant() -> str | None:
    """The build MODALKV_KERNELS asks for: None (``0``: pure torch), ``"scalar"`` or ``"default"`` (anything else)."""
    value = os.environ.get("MODALKV_KERNELS", "1")
    if value == "0":
        return None
    return "scalar" if value == "scalar" else "default"


def _flags(variant: str) -> list[str]:
    return FLAGS + VARIANTS[variant]


def _target(variant: str = "default") -> Path:
    flags = _flags(variant)
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(flags).encode() + _cpu_id().encode()).hexdigest()[:16]
    base = os.environ.get("MODALKV_KERNEL_DIR") or str(Path.home() / ".cache" / "modalkv" / "kernels")
    return Path(base) / f"modalkv_kernels_{key}.so"


def build(verbose: bool = False, variant: str = "default") -> Path | None:
    """Compile the library (if not built yet) and return its path, or None when it cannot be built."""
    target = _target(variant)
    if target.exists():
        return target
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        flags = _flags(variant)
        for flags in (flags, [f for f in flags if f != "-fopenmp"]):  # without OpenMP if it is not available
            proc = subprocess.run([cc, *flags, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(out, target)
                return target
            if verbose:
                print(proc.stderr, file=sys.stderr)
    return None


def library():
    """The loaded kernel library (ctypes.CDLL), or None: pure torch reads (see the module docstring)."""
    variant = _variant()
    if variant is None:
        return None
    if variant not in _STATE:
        with _LOCK:
            if variant not in _STATE:
                lib = None
                try:
                    path = build(variant=variant)
                    if path is not None:
                        lib = ctypes.CDLL(str(path))
                        c_int, p = ctypes.c_int, ctypes.c_void_p
                        lib.kivi_logits.argtypes = [c_int, p] + [c_int] * 6
                        lib.kivi_mix.argtypes = [c_int, p] + [c_int] * 6
                        lib.spherical_logits.argtypes = [c_int, p] + [c_int] * 8
                        lib.dense_logits.argtypes = [c_int, p] + [c_int] * 4
                        lib.dense_mix.argtypes = [c_int, p] + [c_int] * 4
                        lib.simd_build.argtypes = []
                except OSError:
                    lib = None
                _STATE[variant] = lib
    return _STATE[variant]


def tasks(rows: list[tuple]) -> torch.Tensor:
    """The int64 task table a kernel takes: one row of words (pointers and counts) per task."""
    return torch.tensor(rows, dtype=torch.int64)


def row(t: torch.Tensor, b: int, h: int | None = None) -> int:
    """The address of ``t[b]`` or ``t[b, h]``, by pointer arithmetic: no tensor is made per task (this runs once per
    task and tensor in every decode step, so it avoids anything slower than two stride reads)."""
    stride = t.stride()
    offset = b * stride[0] if h is None else b * stride[0] + h * stride[1]
    return t.data_ptr() + offset * t.element_size()


def threads() -> int:
    return torch.get_num_threads()


if __name__ == "__main__":  # python -m modalkv.storage.kernels: build once (scripts/install.sh)
    path = build(verbose=True)
    print(path if path is not None else "modalkv: fused kernels not built (no C compiler?); pure torch reads are used")
