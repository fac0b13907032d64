"""Modality detection for VLM families, and eviction on tiny random VLMs with pixel inputs (exact vs the masked
full cache, modality caps honoured)."""

import pytest
import torch
from transformers import (CLIPVisionConfig, Gemma3Config, Gemma3ForConditionalGeneration, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          Qwen2VLConfig, Qwen2VLForConditionalGeneration, SmolVLMConfig,
                          SmolVLMForConditionalGeneration)

from helpers import Recorder, masked_reference, run_steps
from modalkv import KVCache
from modalkv.modality import IMAGE, TEXT, VIDEO, detect_modality, special_token_modalities, tokens_per_image

TXT = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
IMG = 299


def llava(impl="sdpa"):
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=32, patch_size=8,
                                                     projection_dim=32),
                      text_config=LlamaConfig(**TXT), image_token_index=IMG, image_seq_length=16,
                      vision_feature_layer=-1)
    cfg.text_config._attn_implementation = impl
    return LlavaForConditionalGeneration(cfg).eval()


def qwen2vl(impl="sdpa"):
    torch.manual_seed(0)
    cfg = Qwen2VLConfig(text_config=dict(TXT, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                "mrope_section": [2, 3, 3]}),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4,
                                           spatial_merge_size=2, temporal_patch_size=2),
                        image_token_id=290, video_token_id=291, vision_start_token_id=292, vision_end_token_id=293)
    cfg.text_config._attn_implementation = impl
    return Qwen2VLForConditionalGeneration(cfg).eval()


def smolvlm(impl="sdpa"):
    torch.manual_seed(0)
    cfg = SmolVLMConfig(text_config=dict(TXT, model_type="llama"),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        image_token_id=IMG, scale_factor=2)
    cfg.text_config._attn_implementation = impl
    return SmolVLMForConditionalGeneration(cfg).eval()


def gemma3(impl="sdpa"):
    """Gemma-3: sliding-window + global layers, images pooled to ``mm_tokens_per_image`` tokens between BOI/EOI,
    bidirectional attention among an image's tokens at prefill (``token_type_ids``)."""
    torch.manual_seed(0)
    cfg = Gemma3Config(text_config=dict(TXT, head_dim=16, sliding_window=16,
                                        layer_types=["sliding_attention", "full_attention"]),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=32, patch_size=8),
                       mm_tokens_per_image=4, image_token_index=IMG, boi_token_index=297, eoi_token_index=298)
    cfg.text_config._attn_implementation = impl
    return Gemma3ForConditionalGeneration(cfg).eval()


def text_ids(n, seed):
    return torch.randint(3, 280, (1, n), generator=torch.Generator().manual_seed(seed))


def llava_inputs(images=2):
    parts = [torch.tensor([[1, 5, 6]])]
    for i in range(images):
        parts += [torch.full((1, 16), IMG), text_ids(4, i)]
    parts.append(text_ids(20, 9))
    ids = torch.cat(parts, 1)
    return ids, dict(pixel_values=torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def qwen_inputs():
    ids = torch.cat([torch.tensor([[1, 5, 292]]), torch.full((1, 4), 290), torch.tensor([[293]]),
                     text_ids(24, 3), torch.tensor([[292]]), torch.full((1, 4), 290), torch.tensor([[293]]),
                     text_ids(8, 5)], 1)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])  # 16 patches each -> 4 LLM tokens (merge 2)
    pix = torch.randn(32, 3 * 2 * 4 * 4, generator=torch.Generator().manual_seed(0))
    return ids, dict(pixel_values=pix, image_grid_thw=grid, mm_token_type_ids=(ids == 290).long())


def smolvlm_inputs():
    ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, 4), IMG), text_ids(24, 4)], 1)
    return ids, dict(pixel_values=torch.randn(1, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0)))


def gemma3_inputs():
    ids = torch.cat([torch.tensor([[1, 5, 297]]), torch.full((1, 4), IMG), torch.tensor([[298]]), text_ids(12, 6),
                     torch.tensor([[297]]), torch.full((1, 4), IMG), torch.tensor([[298]]), text_ids(12, 7)], 1)
    pix = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return ids, dict(pixel_values=pix, token_type_ids=(ids == IMG).long())


FAMILIES = {"llava": (llava, llava_inputs), "qwen2vl": (qwen2vl, qwen_inputs), "smolvlm": (smolvlm, smolvlm_inputs),
            "gemma3": (gemma3, gemma3_inputs)}


def test_token_ids_per_family():
    assert special_token_modalities(llava().config) == {IMG: IMAGE}
    assert special_token_modalities(qwen2vl().config) == {290: IMAGE, 291: VIDEO}
    assert special_token_modalities(smolvlm().config) == {IMG: IMAGE}
    g = Gemma3Config(mm_tokens_per_image=4)
    assert special_token_modalities(g) == {g.image_token_id: IMAGE} and tokens_per_image(g) == 4
    assert special_token_modalities(LlamaConfig(**TXT)) == {}
    assert tokens_per_image(llava().config) == 16 and tokens_per_image(smolvlm().config) == 4


def test_llava_grid_and_adjacent_images_split():
    cfg = llava().config
    ids = torch.cat([torch.tensor([[1, 5]]), torch.full((1, 32), IMG), text_ids(3, 0)], 1)  # two images back to back
    lay = detect_modality(cfg, ids)
    vis = lay.ids[0] == IMAGE
    assert int(vis.sum()) == 32 and (lay.ids[0, :2] == TEXT).all()
    assert lay.item[0, 2:18].eq(0).all() and lay.item[0, 18:34].eq(1).all() and lay.item[0, ~vis].eq(-1).all()
    assert lay.row[0, 2:18].tolist() == [r for r in range(4) for _ in range(4)]
    assert lay.col[0, 2:18].tolist() == list(range(4)) * 4
    with pytest.raises(ValueError, match="not a whole number of images of 16 tokens"):
        detect_modality(cfg, torch.cat([torch.full((1, 20), IMG), text_ids(3, 0)], 1))


def test_qwen2vl_image_and_video_grids():
    cfg = qwen2vl().config
    ids = torch.cat([torch.tensor([[1, 292]]), torch.full((1, 4), 290), torch.tensor([[293, 292]]),
                     torch.full((1, 8), 291), torch.tensor([[293, 7]])], 1)
    lay = detect_modality(cfg, ids, image_grid_thw=[[1, 4, 4]], video_grid_thw=[[2, 4, 4]])
    img, vid = lay.ids[0] == IMAGE, lay.ids[0] == VIDEO
    assert int(img.sum()) == 4 and int(vid.sum()) == 8
    assert lay.row[0, img].tolist() == [0, 0, 1, 1] and lay.col[0, img].tolist() == [0, 1, 0, 1]
    assert lay.frame[0, vid].tolist() == [0] * 4 + [1] * 4
    with pytest.raises(ValueError, match="does not match the pixel inputs"):
        detect_modality(cfg, ids, image_grid_thw=[[1, 8, 8]], video_grid_thw=[[2, 4, 4]])


def test_mm_token_type_ids_must_agree():
    cfg = llava().config
    ids, _ = llava_inputs(1)
    good = (ids == IMG).long()
    assert torch.equal(detect_modality(cfg, ids, mm_token_type_ids=good).ids, good.to(torch.int8))
    bad = good.clone()
    bad[0, 0] = 1
    with pytest.raises(ValueError, match="disagree with the config's image/video token ids at 1 position"):
        detect_modality(cfg, ids, mm_token_type_ids=bad)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vlm_eviction_is_exact_and_caps_visual_tokens(family, impl):
    """Prefill with pixels + 6 decode steps under SnapKV 0.5 with visual tokens capped at 25 %: equals the full
    cache with the same positions masked; each head keeps at most the cap of the image tokens."""
    build, inputs = FAMILIES[family]
    model = build(impl)
    ids, extra = inputs()
    lay = detect_modality(model.config, ids, image_grid_thw=extra.get("image_grid_thw"))
    n_img = int((lay.ids == IMAGE).sum())
    assert n_img > 0
    cache = KVCache(model, "snapkv", 0.5, modality_caps={"image": 0.25}, window=4, kernel=3)
    cache.set_modality(lay.ids)
    with Recorder() as rec:
        got, fed = run_steps(model, ids, None, cache, 6, extra=extra)
    want = masked_reference(model, ids, None, rec.records, fed, extra=extra)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-4
    unmasked = masked_reference(model, ids, None, None, fed, extra=extra)
    assert max(float((g - u).abs().max()) for g, u in zip(got, unmasked)) > 1e-3
    img_pos = torch.nonzero(lay.ids[0] == IMAGE).flatten()
    for layer in cache.managed_layers:
        for store in layer.heads:
            kept = store.pos[0, : store.n][store.valid[0, : store.n]]
            assert int(torch.isin(kept, img_pos).sum()) <= int(0.25 * n_img + 1e-9)
