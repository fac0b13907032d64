"""The bundled models as transformers citizens: modalkv-vlm's chat template renders the training format, and a
modalkv cache passed through ``generate`` kwargs works with chat inputs and with transformers pipelines."""

import pytest
import torch
from PIL import Image

from modalkv import KVCache, cache_kwargs, load_model, vlm
from modalkv.modality import IMAGE, detect_modality
from modalkv.tasks.multimodal import image_prompt

pytestmark = pytest.mark.real

NEW = 4  # generated tokens per check


@pytest.fixture(scope="module")
def vlm_model():
    return load_model("modalkv-vlm")


@pytest.fixture(scope="module")
def questions():
    q, a, paths = vlm.easy_vqa_split("test")
    return q[:3], paths[:3]


def image(path):
    return Image.open(path).convert("RGB")


def user(*content):
    return [{"role": "user", "content": list(content)}]


def text(t):
    return {"type": "text", "text": t}


def kept_image_entries(cache) -> int:
    return sum(int(((s.mod[:, : s.n] == IMAGE) & s.valid[:, : s.n]).sum())
               for layer in cache.managed_layers for s in layer.heads)


def test_template_renders_the_training_format(vlm_model):
    _, processor = vlm_model
    assert processor.chat_template == processor.tokenizer.chat_template == vlm.CHAT_TEMPLATE

    def render(messages):
        return processor.apply_chat_template(messages, add_generation_prompt=True)

    q = "what shape is in the image?"
    assert render(user({"type": "image"}, text(q))) == vlm.prompt_text(q)
    assert render(user({"type": "image"}, {"type": "image"}, text(q))) == vlm.prompt_text(q, images=2)
    labelled = user(text("Image 1: "), {"type": "image"}, text("Image 2: "), {"type": "image"}, text("\n" + q))
    assert render(labelled) == vlm.chat_text(image_prompt(2, q))
    assert render([{"role": "user", "content": q}]) == vlm.chat_text(q)  # text-only, string content
    assert render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}]) == vlm.chat_text(
        q, system="Be brief.")
    three = render(user({"type": "image"}, text("a"), {"type": "image"}, text("b"), {"type": "image"}))
    assert three.count(vlm.IMAGE_TOKEN) == 3
    with pytest.raises(Exception, match="image and text entries, not video"):
        render(user({"type": "video"}, text(q)))


def test_tokenized_chat_is_the_training_prompt(vlm_model, questions):
    model, processor = vlm_model
    (q, *_), paths = questions
    n = model.config.image_seq_length
    inputs = processor.apply_chat_template(user({"type": "image", "image": image(paths[0])}, text(q)),
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs.input_ids[0].tolist() == vlm.prompt_ids(processor.tokenizer, q, n)
    assert inputs.attention_mask.all()
    assert torch.equal(inputs.pixel_values, vlm.load_images(paths[:1], processor))
    two = processor.apply_chat_template(
        user({"type": "image", "image": image(paths[0])}, {"type": "image", "image": image(paths[1])}, text(q)),
        add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert two.input_ids[0].tolist() == vlm.expand_ids(processor.tokenizer, vlm.prompt_text(q, images=2), n)
    assert torch.equal(two.pixel_values, vlm.load_images(paths[:2], processor))


def test_generate_on_chat_inputs_with_a_modalkv_cache(vlm_model, questions):
    model, processor = vlm_model
    (q, *_), paths = questions
    inputs = processor.apply_chat_template(user({"type": "image", "image": image(paths[0])}, text(q)),
                                           add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    cache = KVCache(model, "snapkv", 0.25)
    out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **cache_kwargs(model, cache))
    ids = torch.tensor([vlm.prompt_ids(processor.tokenizer, q, model.config.image_seq_length)])
    ref_cache = KVCache(model, "snapkv", 0.25)
    ref = model.generate(input_ids=ids, pixel_values=vlm.load_images(paths[:1], processor), max_new_tokens=NEW,
                         do_sample=False, **cache_kwargs(model, ref_cache))
    assert torch.equal(out, ref)
    report = cache.memory_report()
    assert report["tokens_seen"] == out.shape[1] - 1 and report["compression_ratio"] > 2  # the cache was used
    assert report == ref_cache.memory_report()


def test_image_text_pipeline_equals_generate(vlm_model, questions):
    from transformers import pipeline

    model, processor = vlm_model
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    q, paths = questions
    for i in range(2):
        chat = user({"type": "image", "image": image(paths[i])}, text(q[i]))
        cache = KVCache(model, "snapkv", 0.25)  # one cache per call: it holds one prompt's state
        got = pipe(text=chat, return_tensors=True, generate_kwargs={
            "max_new_tokens": NEW, "do_sample": False, **cache_kwargs(model, cache)})[0]["generated_token_ids"]
        inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")
        ref_cache = KVCache(model, "snapkv", 0.25)
        ref = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **cache_kwargs(model, ref_cache))[0]
        assert got.tolist() == ref.tolist()
        assert cache.memory_report() == ref_cache.memory_report()
        assert cache.memory_report()["tokens_seen"] == len(ref) - 1


def test_a_reset_cache_serves_the_next_pipeline_call(vlm_model, questions):
    from transformers import pipeline

    model, processor = vlm_model
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    q, paths = questions
    cache = KVCache(model, "h2o", 0.3)
    outputs = []
    for i in range(2):
        cache.reset()  # without it the second call would continue the first prompt's cache
        kwargs = {"max_new_tokens": NEW, "do_sample": False, **cache_kwargs(model, cache)}
        outputs.append(pipe(text=user({"type": "image", "image": image(paths[i])}, text(q[i])),
                            return_tensors=True, generate_kwargs=kwargs)[0]["generated_token_ids"].tolist())
    fresh = KVCache(model, "h2o", 0.3)
    kwargs = {"max_new_tokens": NEW, "do_sample": False, **cache_kwargs(model, fresh)}
    alone = pipe(text=user({"type": "image", "image": image(paths[1])}, text(q[1])), return_tensors=True,
                 generate_kwargs=kwargs)[0]["generated_token_ids"].tolist()
    assert outputs[1] == alone
    assert cache.memory_report() == fresh.memory_report()


def test_pipeline_cache_knows_which_entries_are_image_tokens(vlm_model, questions):
    from transformers import pipeline

    model, processor = vlm_model
    (q, *_), paths = questions
    chat = user({"type": "image", "image": image(paths[0])}, text(q))
    inputs = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    ref_cache = KVCache(model, "snapkv", 0.5, modality_caps={"image": 0.1})
    ref_cache.set_modality(detect_modality(model.config, inputs.input_ids))
    model.generate(**inputs, max_new_tokens=2, do_sample=False, **cache_kwargs(model, ref_cache))
    cache = KVCache(model, "snapkv", 0.5, modality_caps={"image": 0.1})
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    pipe(text=chat, generate_kwargs={"max_new_tokens": 2, "do_sample": False, **cache_kwargs(model, cache)})
    assert kept_image_entries(ref_cache) > 0
    assert kept_image_entries(cache) == kept_image_entries(ref_cache)


def test_text_generation_pipeline_equals_generate():
    from transformers import pipeline

    model, tok = load_model("smollm2-135m")
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    cache = KVCache(model, "snapkv", 0.5, window=8)
    got = pipe(chat, return_tensors=True, max_new_tokens=NEW, do_sample=False,  # generate kwargs go in directly
               **cache_kwargs(model, cache))[0]["generated_token_ids"]
    inputs = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ref_cache = KVCache(model, "snapkv", 0.5, window=8)
    ref = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, **cache_kwargs(model, ref_cache))[0]
    assert list(got) == ref.tolist()
    assert cache.memory_report() == ref_cache.memory_report()
    assert cache.memory_report()["compression_ratio"] > 1.5
