"""modalkv's VLM: assembly on the real SmolLM2, LoRA merge equivalence, save/load round trip, input checks."""

import pytest
import torch

from modalkv import vlm, vlm_train
from modalkv.modality import IMAGE, detect_modality

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    spec = vlm.VLMSpec(vision_hidden=48, vision_layers=1, vision_heads=2, lora_rank=4, lora_alpha=8)
    model, processor = vlm.build(spec)
    return spec, model, processor


def inputs(processor, spec, n_questions=2):
    q, a, paths = vlm.easy_vqa_split("test")
    ids, labels, mask = vlm_train._batch(processor, q[:n_questions], a[:n_questions], spec.tokens_per_image)
    return ids, mask, vlm.load_images(paths[:n_questions], processor)


def test_assembled_llava_keeps_smollm2_and_places_image_tokens(built):
    from modalkv.models import load_model

    spec, model, processor = built
    lm, _ = load_model("smollm2-135m")
    assert torch.equal(model.model.language_model.layers[3].mlp.up_proj.weight, lm.model.layers[3].mlp.up_proj.weight)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    ids, mask, pixels = inputs(processor, spec)
    lay = detect_modality(model.config, ids)
    assert (lay.ids == IMAGE).sum(1).tolist() == [spec.tokens_per_image] * 2
    assert lay.row.max() == 7 and lay.col.max() == 7
    # the processor expands the placeholder the same way the training batches do
    text = processor(text=[vlm.prompt_text("what shape is in the image?")], images=[torch.zeros(3, 64, 64)],
                     return_tensors="pt")
    assert int((text.input_ids == model.config.image_token_id).sum()) == spec.tokens_per_image


def test_lora_merge_and_save_load_round_trip(built, tmp_path):
    spec, model, processor = built
    vlm.add_lora(model, spec)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # LoRA starts as a no-op; make it act
            if "lora_" in name or "vision_tower" in name or "multi_modal_projector" in name:
                p.copy_(p.half().float())  # what the fp16 file will hold
    ids, mask, pixels = inputs(processor, spec)
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    vlm_train.save(model, spec, {"test": True}, tmp_path)
    assert (tmp_path / "weights.safetensors").stat().st_size < 20 * 2**20
    loaded, proc2 = vlm.load_vlm(folder=tmp_path)
    assert not any("lora_" in n for n, _ in loaded.named_parameters())  # merged into plain Linear layers
    with torch.no_grad():
        after = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    assert (before - after).abs().max() < 1e-3
    assert (before - loaded.model.language_model.embed_tokens.weight.sum()).abs().max() > 0  # not trivial


def test_one_training_step_moves_only_the_trained_parts():
    torch.manual_seed(0)
    spec = vlm.VLMSpec(vision_hidden=48, vision_layers=1, vision_heads=2, lora_rank=4, lora_alpha=8)
    model, processor = vlm.build(spec)
    frozen = model.model.language_model.layers[0].mlp.up_proj.weight.clone()
    proj = model.model.multi_modal_projector.linear_1.weight.clone()
    assert vlm_train.train_vqa(model, processor, spec, minutes=5, batch=2, max_steps=1) == 1
    assert torch.equal(model.model.language_model.layers[0].mlp.up_proj.base_layer.weight, frozen)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, proj)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_tokens_per_image_and_errors(built, tmp_path):
    spec, model, processor = built
    vlm_train.save(model, spec, {}, tmp_path)
    big, proc = vlm.load_vlm(tokens_per_image=256, folder=tmp_path)
    assert proc.image_processor.size == {"height": 128, "width": 128}
    q, a, paths = vlm.easy_vqa_split("test")
    ids, labels, mask = vlm_train._batch(proc, q[:1], a[:1], 256)
    with torch.no_grad():
        out = big(input_ids=ids, attention_mask=mask, pixel_values=vlm.load_images(paths[:1], proc))
    assert out.logits.shape[1] == ids.shape[1]
    with pytest.raises(ValueError, match="tokens_per_image must be a square"):
        vlm.load_vlm(tokens_per_image=120, folder=tmp_path)
    with pytest.raises(FileNotFoundError, match="train it with `modalkv train-vlm`"):
        vlm.load_vlm(folder=tmp_path / "nothing")
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        vlm.easy_vqa_split("dev")


# -- the shipped weights ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    from modalkv.models import load_model

    return load_model("modalkv-vlm")


def test_shipped_vlm_answers_easy_vqa(shipped):
    model, processor = shipped
    assert hasattr(processor, "image_processor") and model.config.image_seq_length == 64
    res = vlm_train.evaluate(model, processor, n=96, seed=1)
    assert res["accuracy"] >= 0.8, res  # chance (always "no") is ~0.37


def test_deferred_question_through_the_cache_equals_one_prefill(shipped):
    """The runner's multimodal path: the image is detected, caps hold, and a deferred question read through the
    full cache gives the logits of prefilling the whole prompt at once."""
    from modalkv.bench.runner import ModelRunner
    from modalkv.replay import capture_prefill
    from modalkv.tasks import get_task

    runner = ModelRunner.__new__(ModelRunner)
    runner.model, runner.processor = shipped
    runner.tok = runner.processor.tokenizer
    sample = get_task("vqa_deferred").make(runner.tok, 400, 0)
    ids, tail, extra = runner.mm_inputs(sample)
    assert sample.question in runner.tok.decode(tail[0]) and sample.question not in runner.tok.decode(ids[0])
    cap = capture_prefill(runner.model, ids, **extra)
    assert int((cap.modality == IMAGE).sum()) == 64
    capped = cap.build_cache(runner.model, "snapkv", 0.25, modality_caps={"image": 0.1})
    img = torch.nonzero(cap.modality[0] == IMAGE).flatten()
    for layer in capped.managed_layers:
        for store in layer.heads:
            kept = store.pos[0, : store.n][store.valid[0, : store.n]]
            assert int(torch.isin(kept, img).sum()) <= 7  # ceil(0.1 * 64)
    got = runner._read(cap.build_cache(runner.model, "full"), tail, ids.shape[1])
    with torch.no_grad():
        want = runner.model(input_ids=torch.cat([ids, tail], 1), **extra).logits[0, -1]
    assert (got - want).abs().max() < 1e-3


def test_runner_gives_a_pruning_method_its_own_prefill(shipped):
    """HAE with DAP in prune mode changes the prompt forward: the bench must not replay the captured full prefill for
    it. Thresholds that prune 26 % of the image on this model (docs/results/seeds_hae_madakv.md)."""
    from modalkv.bench.runner import ModelRunner
    from modalkv.tasks import get_task

    runner = ModelRunner.__new__(ModelRunner)
    runner.model, runner.processor = shipped
    runner.tok = runner.processor.tokenizer
    ids, _, extra = runner.mm_inputs(get_task("vqa_distract").make(runner.tok, 400, 0))
    cap, _ = runner._capture(ids, **extra)
    prune = "hae(thresholds=absolute,tau_g=0.0147,tau_i=1.0)"
    cache, _, own = runner._build(cap, {"method": prune, "budget": 1.0}, None, ids, extra)
    assert own is not None and int(cache.method.dap_evicted[0]) > 0
    img = torch.nonzero(cap.modality[0] == IMAGE).flatten()
    layers = [sorted(s.pos[0, : s.n].tolist()) for layer in cache.managed_layers for s in layer.heads]
    assert all(p == layers[0] for p in layers) and len(layers[0]) == ids.shape[1] - int(cache.method.dap_evicted[0])
    assert int(torch.isin(torch.tensor(layers[0]), img).sum()) == 64 - int(cache.method.dap_evicted[0])
    kv_only, _, replayed = runner._build(cap, {"method": prune[:-1] + ",mode=kv_only)", "budget": 1.0}, None, ids,
                                         extra)
    assert replayed is None  # kv_only is the same forward: replayed from the capture
    assert [sorted(s.pos[0, : s.n].tolist()) for layer in kv_only.managed_layers for s in layer.heads] == layers
    assert (own - cap.logits[0, -1]).abs().max() > 1e-4  # the pruned forward really differs
