"""Tiny random models for the tests and the demo's ``--tiny-vlm``, with their inputs (transformers 5.17).

Text decoders: hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocabulary :data:`V` = 512.
:data:`TEXT_MODELS` (Llama, Qwen2, Gemma3) are built by :func:`build_text`; :data:`VLMS` (ten VLM families, a
tiny vision tower of hidden 32 on 32x32 images, image token id :data:`IMG`) by :func:`build_vlm`.
"""

from __future__ import annotations

import torch
import transformers as T

V, IMG = 512, 500
TXT = dict(
    vocab_size=V,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _clip() -> T.CLIPVisionConfig:
    return T.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        projection_dim=32,
    )


def _siglip(**kw) -> T.SiglipVisionConfig:
    return T.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        **kw,
    )


_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}

TEXT_MODELS = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**TXT)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**TXT)),
    "gemma3": lambda: T.Gemma3ForCausalLM(
        T.Gemma3TextConfig(
            **TXT, query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
    ),
}


def _text(ids: list[int]) -> torch.Tensor:
    return torch.tensor([ids])


def _vlm_llava():
    cfg = T.LlavaConfig(
        vision_config=_clip(), text_config=T.LlamaConfig(**TXT), image_token_index=IMG, image_seq_length=16
    )
    return T.LlavaForConditionalGeneration(cfg), dict(
        input_ids=_text([1] + [IMG] * 16 + [5, 6, 7]), pixel_values=torch.randn(1, 3, 32, 32)
    )


def _vlm_llava_next():
    cfg = T.LlavaNextConfig(
        vision_config=_clip(),
        text_config=T.LlamaConfig(**TXT),
        image_token_index=IMG,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
        image_seq_length=16,
    )
    return T.LlavaNextForConditionalGeneration(cfg), dict(
        input_ids=_text([1] + [IMG] * 36 + [5, 6, 7]),
        pixel_values=torch.randn(1, 2, 3, 32, 32),
        image_sizes=torch.tensor([[32, 32]]),
    )


def _vlm_onevision():
    cfg = T.LlavaOnevisionConfig(
        vision_config=_siglip(),
        text_config=T.Qwen2Config(**TXT),
        image_token_index=IMG,
        video_token_index=501,
        image_grid_pinpoints=[[32, 32], [32, 64], [64, 32], [64, 64]],
    )
    return T.LlavaOnevisionForConditionalGeneration(cfg), dict(
        input_ids=_text([1] + [IMG] * 36 + [5, 6, 7]),
        pixel_values=torch.randn(1, 2, 3, 32, 32),
        image_sizes=torch.tensor([[32, 32]]),
    )


def _qwen_vl(vision_cfg, cfg_cls, model_cls):
    text = (
        T.Qwen2Config(**TXT, rope_parameters=_QWEN_ROPE)
        if cfg_cls is T.Qwen2VLConfig
        else T.Qwen2_5_VLTextConfig(**TXT, rope_parameters=_QWEN_ROPE)
    )
    cfg = cfg_cls(
        vision_config=vision_cfg,
        text_config=text.to_dict(),
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
    )
    ids = _text([1, 502] + [500] * 16 + [503, 5, 6, 7])
    return model_cls(cfg), dict(
        input_ids=ids,
        pixel_values=torch.randn(64, 3 * 2 * 4 * 4),
        image_grid_thw=torch.tensor([[1, 8, 8]]),
        mm_token_type_ids=(ids == 500).long(),
    )


def _vlm_qwen2_vl():
    vision = T.Qwen2VLVisionConfig(
        depth=2,
        embed_dim=32,
        hidden_size=64,
        mlp_ratio=2,
        num_heads=2,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    return _qwen_vl(vision, T.Qwen2VLConfig, T.Qwen2VLForConditionalGeneration)


def _vlm_qwen2_5_vl():
    vision = T.Qwen2_5_VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        fullatt_block_indexes=[1],
    )
    return _qwen_vl(vision, T.Qwen2_5_VLConfig, T.Qwen2_5_VLForConditionalGeneration)


def _vlm_idefics3():
    cfg = T.Idefics3Config(
        vision_config=T.Idefics3VisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        text_config=T.LlamaConfig(**TXT),
        image_token_id=IMG,
        scale_factor=2,
    )
    return T.Idefics3ForConditionalGeneration(cfg), dict(
        input_ids=_text([1] + [IMG] * 4 + [5, 6, 7]), pixel_values=torch.randn(1, 1, 3, 32, 32)
    )


def _vlm_gemma3():
    cfg = T.Gemma3Config(
        text_config=T.Gemma3TextConfig(**TXT, query_pre_attn_scalar=16, sliding_window=8),
        vision_config=_siglip(),
        mm_tokens_per_image=4,
        boi_token_index=502,
        eoi_token_index=503,
        image_token_index=IMG,
    )
    ids = _text([1, 5, 502] + [IMG] * 4 + [503, 5, 6, 7, 8, 9, 10, 11])
    return T.Gemma3ForConditionalGeneration(cfg), dict(
        input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == IMG).long()
    )


def _vlm_paligemma():
    cfg = T.PaliGemmaConfig(
        text_config=T.GemmaConfig(**TXT),
        vision_config=_siglip(projection_dim=64),
        image_token_index=IMG,
        vocab_size=V,
        projection_dim=64,
        hidden_size=64,
    )
    ids = _text([IMG] * 16 + [1, 5, 6, 7])
    return T.PaliGemmaForConditionalGeneration(cfg), dict(
        input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=torch.zeros_like(ids)
    )


def _vlm_internvl():
    cfg = T.InternVLConfig(
        vision_config=T.InternVLVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=[32, 32],
            patch_size=[8, 8],
        ),
        text_config=T.Qwen2Config(**TXT),
        image_token_id=IMG,
        image_seq_length=4,
        downsample_ratio=0.5,
    )
    return T.InternVLForConditionalGeneration(cfg), dict(
        input_ids=_text([1] + [IMG] * 4 + [5, 6, 7]), pixel_values=torch.randn(1, 3, 32, 32)
    )


def _vlm_mllama():
    text = {k: v for k, v in TXT.items() if k not in ("head_dim", "num_hidden_layers")}
    cfg = T.MllamaConfig(
        vision_config=T.MllamaVisionConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_global_layers=1,
            attention_heads=2,
            intermediate_size=64,
            vision_output_dim=64,
            image_size=32,
            patch_size=8,
            max_num_tiles=1,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        text_config=T.MllamaTextConfig(**text, num_hidden_layers=3, cross_attention_layers=[1]),
        image_token_index=V,
    )
    ids = _text([1, V, 5, 6, 7, 8])
    xmask = torch.zeros(1, ids.shape[1], 1, 1, dtype=torch.long)
    xmask[:, 1:] = 1
    return T.MllamaForConditionalGeneration(cfg), dict(
        input_ids=ids,
        pixel_values=torch.randn(1, 1, 1, 3, 32, 32),
        aspect_ratio_ids=torch.tensor([[1]]),
        aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long),
        cross_attention_mask=xmask,
    )


VLMS = {
    "llava": _vlm_llava,
    "llava_next": _vlm_llava_next,
    "llava_onevision": _vlm_onevision,
    "qwen2_vl": _vlm_qwen2_vl,
    "qwen2_5_vl": _vlm_qwen2_5_vl,
    "idefics3": _vlm_idefics3,
    "gemma3": _vlm_gemma3,
    "paligemma": _vlm_paligemma,
    "internvl": _vlm_internvl,
    "mllama": _vlm_mllama,
}


def build_vlm(name: str, attn: str = "sdpa", seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(model in eval mode, inputs) of a tiny random VLM, seeded; inputs: input_ids [1, L] int64 holding the
    image tokens, pixel_values float32 and the model's other image inputs."""
    torch.manual_seed(seed)
    model, inputs = VLMS[name]()
    model = model.eval()
    model.set_attn_implementation(attn)
    return model, inputs


def build_text(name: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM in eval mode, seeded."""
    torch.manual_seed(seed)
    model = TEXT_MODELS[name]().eval()
    model.set_attn_implementation(attn)
    return model
