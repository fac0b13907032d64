"""The multimodal tasks (easy-VQA with distractors, multi-image retrieval, deferred importance, describe), stage 3's
training stream, per-modality caps in method labels, and the bench's checks."""

import pytest
from transformers import AutoTokenizer

from modalkv import vlm
from modalkv.bench import BenchConfig
from modalkv.budget import parse_caps
from modalkv.methods import parse_label
from modalkv.tasks import get_task
from modalkv.tasks.multimodal import MMSample, _pool, interleaved_examples

MM_TASKS = ["vqa_distract", "vqa_deferred", "mm_retrieval", "mm_describe"]


@pytest.fixture(scope="module")
def tok():
    from modalkv.models import ensure_converted

    return AutoTokenizer.from_pretrained(str(ensure_converted("smollm2-135m")))


@pytest.mark.parametrize("name", MM_TASKS)
@pytest.mark.parametrize("tpi", [64, 256])
def test_samples_are_deterministic_and_fit(tok, name, tpi):
    task = get_task(name)
    s = task.make(tok, 2048, 3, tokens_per_image=tpi)
    assert s == task.make(tok, 2048, 3, tokens_per_image=tpi)
    assert s != task.make(tok, 2048, 4, tokens_per_image=tpi)
    assert isinstance(s, MMSample) and s.context.count(vlm.IMAGE_TOKEN) == len(s.images) >= 1
    assert s.deferred == (name == "vqa_deferred")
    _, _, test_paths, _ = _pool("test")
    assert set(s.images) <= set(test_paths)  # evaluation draws on the test split only
    n = len(vlm.expand_ids(tok, vlm.chat_text(s.prompt), tpi))
    if name != "mm_describe":  # describe keeps at least 8 images whatever the length
        assert n <= 2048
    if name in ("vqa_distract", "vqa_deferred"):
        assert n > 2048 - 150  # the distractor text fills the length
    assert task.score(s.answers[0], s) == 1.0 and task.score("", s) == 0.0


def test_retrieval_and_describe_shapes(tok):
    r = get_task("mm_retrieval").make(tok, 2048, 0, tokens_per_image=64)
    assert len(r.images) == 16 and r.question.startswith(f"Image {r.meta['target']}: ")
    assert r.answers[0] in vlm.COLORS + vlm.SHAPES  # open questions only: chance is 1/3 or 1/8, not 1/2
    assert len(get_task("mm_retrieval").make(tok, 300, 0, tokens_per_image=256).images) == 2
    d = get_task("mm_describe").make(tok, 1024, 0, tokens_per_image=64)
    lines = d.answers[0].splitlines()
    assert len(lines) == len(d.images) >= 8 and d.max_new_tokens >= 64
    assert len(tok(d.answers[0]).input_ids) >= 64  # a real long generation


def test_describe_score_counts_lines(tok):
    task = get_task("mm_describe")
    s = task.make(tok, 1024, 0, tokens_per_image=64)
    lines = s.answers[0].splitlines()
    half = "\n".join(lines[: len(lines) // 2])
    assert task.score(half, s) == pytest.approx((len(lines) // 2) / len(lines))
    swapped = s.answers[0].replace("Image 1:", "Image 99:")
    assert task.score(swapped, s) == pytest.approx((len(lines) - 1) / len(lines))
    first = lines[0].split(": ", 1)[1]
    wrong = s.answers[0].replace(f"Image 1: {first}", "Image 1: a purple hexagon.")
    assert task.score(wrong, s) < 1.0


def test_first_word_scoring(tok):
    task = get_task("vqa_distract")
    s = task.make(tok, 512, 0)
    assert task.score(f" {s.answers[0].capitalize()}.", s) == 1.0
    assert task.score(f"not {s.answers[0]}", s) == 0.0


def test_interleaved_training_stream(tok):
    train_paths = set(_pool("train")[2])
    kinds = set()
    it = interleaved_examples(tok, seed=1)
    for _ in range(200):
        content, answer, paths = next(it)
        assert content.count(vlm.IMAGE_TOKEN) == len(paths) >= 1 and answer
        assert set(paths) <= train_paths  # stage 3 never sees a test image
        kinds.add("describe" if "Describe" in content else "retrieval" if "Image 2:" in content else
                  "text" if len(content) > 200 else "single")
    assert kinds == {"describe", "retrieval", "text", "single"}
    a = [next(interleaved_examples(tok, seed=5)) for _ in range(1)]
    assert a == [next(interleaved_examples(tok, seed=5))]


def test_caps_labels_and_errors():
    assert parse_caps("image=0.1, text=0.5") == {"image": 0.1, "text": 0.5}
    assert parse_label("snapkv@image=0.1") == ("snapkv", {}, {"image": 0.1})
    assert parse_label("h2o") == ("h2o", {}, {})
    assert parse_label("hae(mode=kv_only, tau_g=0.01)@image=0.2") == ("hae", {"mode": "kv_only", "tau_g": 0.01},
                                                                         {"image": 0.2})
    with pytest.raises(ValueError, match="param=value"):
        parse_label("hae(kv_only)")
    for bad, msg in [("pixels=0.1", "modality one of"), ("image", "modality one of"), ("image=lots", "not a number"),
                     ("image=1.5", r"must be in \(0, 1\]")]:
        with pytest.raises(ValueError, match=msg):
            parse_caps(bad)
    cfg = BenchConfig(methods=["snapkv", "kivi-4", "h2o@text=0.5"], modality_caps="image=0.1")
    labels = [c["method"] for c in cfg.cells("m", "t", 10, 0)]
    assert labels[0] == "full" and "snapkv@image=0.1" in labels and "kivi-4" in labels and "h2o@text=0.5" in labels


def test_bench_checks_models_and_tasks():
    from modalkv.cli.bench import check_bench

    with pytest.raises(ValueError, match="need a vision-language model"):
        check_bench(BenchConfig(models=["smollm2-135m"], tasks=["niah_single", "mm_retrieval"]))
    with pytest.raises(ValueError, match="modality one of"):
        check_bench(BenchConfig(models=["modalkv-vlm"], methods=["snapkv@pixels=0.1"], tasks=["mm_retrieval"]))
    check_bench(BenchConfig(models=["modalkv-vlm@256"], methods=["snapkv@image=0.1", "lookm"],
                             tasks=["mm_retrieval", "fidelity"]))


def test_vlm_name_errors():
    from modalkv.models import load_model

    with pytest.raises(ValueError, match="tokens per image"):
        load_model("modalkv-vlm@many")
