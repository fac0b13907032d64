"""modalkv inside vLLM (src/modalkv/serving): policy checks here, the engine in .venv-vllm subprocesses.

The engine tests build .venv-vllm with scripts/vllm_setup.sh when it is missing (about 4 minutes, 3.5 GB) and run
tests/vllm_worker.py there on the bundled SmolLM2-135M (one process per configuration, a few requests each).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from modalkv.serving.policy import ServingConfig, block_plan, check_ratio, parse_params

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("vllm_worker.py")
VENV_PY = ROOT / ".venv-vllm" / "bin" / "python"


# --- no vLLM needed ---------------------------------------------------------------------------------------------

def test_serving_imports_without_vllm():
    code = "import sys, modalkv, modalkv.serving, modalkv.serving.launch, modalkv.serving.plugin; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "False"


def test_block_plan_keeps_the_ratio_and_frees_whole_blocks():
    assert block_plan(2000, 0.25, 128) == (500, 1500)  # ceil(0.25 * 2000), as KVCache keeps for a 0.25 ratio
    assert block_plan(1159, 0.25, 128) == (290, 869)
    assert block_plan(2000, 1.0, 128) == (2000, 0)
    assert block_plan(3, 0.01, 128) == (1, 2)  # at least one entry
    blocks_before, blocks_after = -(-2000 // 128), -(-500 // 128)
    assert (blocks_before - blocks_after) / blocks_before >= 0.70  # the target for a 2,000-token prompt
    with pytest.raises(ValueError, match="block_size"):
        block_plan(10, 0.5, 0)


def test_serving_config_refuses_what_it_cannot_serve():
    with pytest.raises(ValueError, match="cannot be served"):
        ServingConfig("adakv", 0.5)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        ServingConfig("snapkv", 0.0)
    with pytest.raises(TypeError, match="ratio"):
        check_ratio("0.5", "budget")
    with pytest.raises(ValueError, match="window"):
        ServingConfig("snapkv", 0.5, {"window": 0})
    cfg = ServingConfig("snapkv", 0.5, parse_params("window=16,pooling=avg"))
    assert cfg.make().window == 16 and cfg.make().pooling == "avg"
    assert ServingConfig("streamingllm").make().evict_during_decode is False  # the paged cache only appends
    assert cfg.request_budget(None) == 0.5 and cfg.request_budget({"modalkv_budget": 0.25}) == 0.25
    with pytest.raises(ValueError, match="modalkv_budget"):
        cfg.request_budget({"modalkv_budget": 2})
    env = cfg.to_env()
    assert env["MODALKV_VLLM_METHOD"] == "snapkv" and float(env["MODALKV_VLLM_BUDGET"]) == 0.5


def test_serve_command_line(monkeypatch, tmp_path):
    from modalkv.cli import app

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("MODALKV_VLLM_PYTHON", sys.executable)
    out = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--budget", "0.25", "--dry-run"])
    assert out.exit_code == 0, out.output
    assert "MODALKV_VLLM_BUDGET=0.25" in out.output and "--no-enable-prefix-caching" in out.output
    assert "vllm.entrypoints.openai.api_server" in out.output
    bad = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--method", "h2o", "--dry-run"])
    assert bad.exit_code == 2 and "cannot be served" in bad.output
    monkeypatch.setenv("MODALKV_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    missing = CliRunner().invoke(app, ["serve", "--model", str(tmp_path), "--dry-run"])
    assert missing.exit_code == 2 and "vllm_setup.sh" in missing.output


# --- inside vLLM --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vllm_python():
    if not VENV_PY.exists() or subprocess.run([str(VENV_PY), "-c", "import vllm, modalkv.serving"],
                                              capture_output=True).returncode:
        subprocess.run([str(ROOT / "scripts" / "vllm_setup.sh")], check=True)
    return str(VENV_PY)


@pytest.fixture(scope="module")
def smollm():
    from modalkv import load_model

    return load_model("smollm2-135m")


def _text(lines: int, needle: str) -> str:
    body = [f"Line {i}: the weather in town number {i} was mild and the market sold {i * 7 % 13} apples."
            for i in range(lines)]
    body.insert(lines // 3, needle)
    return " ".join(body)


def _prompts(tok):
    return [tok(_text(24, "The secret code is 4172.") + "\nQuestion: What is the secret code? Answer: The secret code is").input_ids,
            tok(_text(16, "The harbour master is called Ilse Brandt.") + "\nQuestion: Who is the harbour master? Answer:").input_ids]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODALKV_VLLM_")}
    env.update(OMP_NUM_THREADS="1", VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", **extra)
    return env


def _run_worker(python, job, **env):
    out = subprocess.run([python, str(WORKER)], input=json.dumps(job), capture_output=True, text=True, env=_env(**env),
                         timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1][7:])


@pytest.fixture(scope="module")
def runs(vllm_python, smollm):
    from modalkv.models import ensure_converted

    _, tok = smollm
    folder = str(ensure_converted("smollm2-135m"))
    prompts = _prompts(tok)
    assert [len(p) for p in prompts] == [562, 372]
    long_prompt = tok(_text(150, "The secret code is 4172.") + "\nQuestion: What is the secret code? Answer:").input_ids[:2000]
    job = {"model": folder, "prompts": prompts, "budgets": [None], "max_tokens": 8}
    return {
        "prompts": prompts,
        "vanilla": _run_worker(vllm_python, job),
        "snapkv": _run_worker(vllm_python, {**job, "budgets": [None, 0.25], "block_pool": long_prompt,
                                            "block_pool_budget": 0.25}, MODALKV_VLLM_METHOD="snapkv"),
        "streaming": _run_worker(vllm_python, {**job, "budgets": [0.25]}, MODALKV_VLLM_METHOD="streamingllm"),
        # prompts prefilled in chunks of at most 60 tokens: the first prompt's last chunk (562 = 9 x 60 + 22) is
        # shorter than SnapKV's 32-query observation window, which then spans two chunks
        "chunked": _run_worker(vllm_python, {**job, "budgets": [0.25], "chunk": 60}, MODALKV_VLLM_METHOD="snapkv"),
    }


def _hf(smollm, prompt, method, budget, steps, **params):
    from modalkv import KVCache, cache_kwargs

    model, _ = smollm
    ids = torch.tensor([prompt])
    kw = {} if method is None else cache_kwargs(model, KVCache(model, method, budget, **params))
    out = model.generate(input_ids=ids, max_new_tokens=steps, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, **kw)
    tokens = out.sequences[0, ids.shape[1]:].tolist()
    return tokens, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]


@pytest.mark.real
def test_budget_one_is_vllms_own_greedy_decoding(runs):
    vanilla, full = runs["vanilla"]["runs"][0], runs["snapkv"]["runs"][0]  # plugin on, server budget 1.0
    assert full["tokens"] == vanilla["tokens"]
    gap = max(abs(a - b) for x, y in zip(full["logprobs"], vanilla["logprobs"]) for a, b in zip(x, y))
    assert gap < 1e-5


@pytest.mark.real
@pytest.mark.parametrize("method, key, params", [("snapkv", "snapkv", {}), ("snapkv", "chunked", {}),
                                                 ("streamingllm", "streaming", {"evict_during_decode": False})])
def test_compressed_decoding_equals_modalkv_kvcache(runs, smollm, method, key, params):
    """The same selection as modalkv's transformers KVCache at budget 0.25: same tokens, logprobs within 1e-3,
    and different from the full cache's (the compression took effect)."""
    served = [r for r in runs[key]["runs"] if r["budget"] == 0.25][0]
    full = runs["vanilla"]["runs"][0]
    moved = 0.0
    for i, prompt in enumerate(runs["prompts"]):
        tokens, logprobs = _hf(smollm, prompt, method, 0.25, len(served["tokens"][i]), **params)
        assert served["tokens"][i] == tokens
        assert max(abs(a - b) for a, b in zip(served["logprobs"][i], logprobs)) < 1e-3
        moved = max(moved, max(abs(a - b) for a, b in zip(served["logprobs"][i], full["logprobs"][i])))
    assert moved > 1e-3


@pytest.mark.real
def test_compression_returns_blocks_to_vllms_pool(runs):
    pool = runs["snapkv"]["pool"]
    free = pool["free"]
    log = [e for e in runs["snapkv"]["log"] if e["tokens"] == 2000]
    assert log, runs["snapkv"]["log"]
    entry = log[-1]
    assert (entry["blocks_before"], entry["kept"], entry["blocks_after"]) == (16, 500, 4)
    # read from vLLM's block pool: the prompt's 16 blocks were taken at prefill, 12 came back at compression
    assert entry["pool_free_after"] - entry["pool_free_before"] == 12
    assert free[0] - min(free) == 16 and free[0] - free[2] == 4
    assert (entry["blocks_before"] - entry["blocks_after"]) / entry["blocks_before"] >= 0.70
    assert free[-1] == free[0]  # everything back once the request finished


def test_patches_check_upstream_names_and_version(vllm_python):
    code = """
import vllm
from modalkv.serving import vllm_patches as p
assert p.check_upstream() == [], p.check_upstream()
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
del GPUModelRunner._prepare_inputs
orig = KVCacheCoordinator.allocate_new_blocks
def moved(self, request_id, n_tokens, num_tokens_main_model, num_encoder_tokens=0): pass
KVCacheCoordinator.allocate_new_blocks = moved
missing = p.check_upstream()
assert any("_prepare_inputs" in m for m in missing) and any("allocate_new_blocks(num_tokens)" in m for m in missing), missing
try:
    p._INSTALLED = False; p.install()
except RuntimeError as err:
    assert "_prepare_inputs" in str(err)
else:
    raise SystemExit("install() accepted a vLLM without _prepare_inputs")
print("ok")
"""
    out = subprocess.run([vllm_python, "-c", code], capture_output=True, text=True, env=_env())
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]
    wrong = "import vllm; vllm.__version__ = '0.31.0'\nimport modalkv.serving.vllm_patches"
    out = subprocess.run([vllm_python, "-c", wrong], capture_output=True, text=True, env=_env())
    assert out.returncode != 0 and "supports vllm 0.32.0 only" in out.stderr and "0.31.0" in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.real
def test_modalkv_serve_answers_through_the_openai_api(vllm_python, smollm):
    port = _free_port()
    env = _env(MODALKV_VLLM_PYTHON=vllm_python, PYTHONPATH=str(ROOT / "src"))
    server = subprocess.Popen([sys.executable, "-m", "modalkv.cli", "serve", "--model", "smollm2-135m", "--budget",
                               "0.25", "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, server.stderr.read()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "server did not start in 10 minutes"
                time.sleep(2)
        text = _text(24, "The secret code is 4172.") + "\nQuestion: What is the secret code? Answer: The secret code is"
        status, full = _post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": text, "max_tokens": 8,
                                                       "temperature": 0, "vllm_xargs": {"modalkv_budget": 1.0}})
        assert status == 200 and "4172" in full["choices"][0]["text"]
        status, small = _post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": text, "max_tokens": 8,
                                                        "temperature": 0})  # the server's 0.25
        assert status == 200 and small["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]
        status, chat = _post(port, "/v1/chat/completions", {
            "model": "smollm2-135m", "max_tokens": 8, "temperature": 0, "vllm_xargs": {"modalkv_budget": 1.0},
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert status == 200 and "Paris" in chat["choices"][0]["message"]["content"]
        status, bad = _post(port, "/v1/completions", {"model": "smollm2-135m", "prompt": "hi", "max_tokens": 2,
                                                      "vllm_xargs": {"modalkv_budget": 1.5}})
        assert status == 400 and "modalkv_budget" in json.dumps(bad)
    finally:
        server.terminate()
        server.wait(timeout=60)
