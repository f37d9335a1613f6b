"""Tiny random models for the tests and the demo's ``--tiny-vlm``, with their inputs (transformers 5.17).

Text decoders: hidden 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, vocabulary :data:`V` = 512.
:data:`TEXT_MODELS` (Llama, Qwen2, Gemma3) are built by :func:`build_text`; :data:`VLMS` (ten VLM families, a
tiny vision tower of hidden 32 on 32x32 images, image token id :data:`IMG`) by :func:`build_vlm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

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


# The vision towers' sizes (CLIP, SigLIP, Idefics3, InternVL; Mllama and the Qwen-VL towers name them otherwise)
VISION = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
)
_QWEN_ROPE = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

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


def _image_prompt(images: int, pixels: tuple[int, ...], **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """input_ids [1, images + 4]: BOS, ``images`` image tokens, three text tokens; random pixel_values of shape
    ``pixels``; then ``extra``."""
    return dict(input_ids=_text([1] + [IMG] * images + [5, 6, 7]), pixel_values=torch.randn(*pixels), **extra)


def _qwen_vl_inputs() -> dict[str, torch.Tensor]:
    ids = _text([1, 502] + [500] * 16 + [503, 5, 6, 7])
    return dict(
        input_ids=ids,
        pixel_values=torch.randn(64, 3 * 2 * 4 * 4),
        image_grid_thw=torch.tensor([[1, 8, 8]]),
        mm_token_type_ids=(ids == 500).long(),
    )


def _qwen_vl_config(cfg_cls: type, text_cls: type, vision: T.PretrainedConfig) -> T.PretrainedConfig:
    return cfg_cls(
        vision_config=vision,
        text_config=text_cls(**TXT, rope_parameters=_QWEN_ROPE).to_dict(),
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
    )


def _gemma3_inputs() -> dict[str, torch.Tensor]:
    ids = _text([1, 5, 502] + [IMG] * 4 + [503, 5, 6, 7, 8, 9, 10, 11])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=(ids == IMG).long())


def _paligemma_inputs() -> dict[str, torch.Tensor]:
    ids = _text([IMG] * 16 + [1, 5, 6, 7])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32), token_type_ids=torch.zeros_like(ids))


def _mllama_inputs() -> dict[str, torch.Tensor]:
    ids = _text([1, V, 5, 6, 7, 8])
    xmask = torch.zeros(1, ids.shape[1], 1, 1, dtype=torch.long)
    xmask[:, 1:] = 1
    return dict(
        input_ids=ids,
        pixel_values=torch.randn(1, 1, 1, 3, 32, 32),
        aspect_ratio_ids=torch.tensor([[1]]),
        aspect_ratio_mask=torch.ones(1, 1, 1, dtype=torch.long),
        cross_attention_mask=xmask,
    )


class _Vlm(NamedTuple):
    """One tiny VLM: its model class, a builder of its config and one of its inputs (called after the model is
    built, so that its random pixels follow the seeded weights)."""

    model: Callable[[T.PretrainedConfig], torch.nn.Module]
    config: Callable[[], T.PretrainedConfig]
    inputs: Callable[[], dict[str, torch.Tensor]]


_MLLAMA_TEXT = {k: v for k, v in TXT.items() if k not in ("head_dim", "num_hidden_layers")}
_QWEN_VISION = dict(depth=2, num_heads=2, patch_size=4, spatial_merge_size=2, temporal_patch_size=2)
_QWEN2_VL_VISION = dict(_QWEN_VISION, embed_dim=32, hidden_size=64, mlp_ratio=2)
_QWEN2_5_VL_VISION = dict(
    _QWEN_VISION, hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16, fullatt_block_indexes=[1]
)
# Mllama's tower: VISION's sizes under its own name for the head count
_MLLAMA_VISION = {("attention_heads" if k == "num_attention_heads" else k): v for k, v in VISION.items()}


def _vlm(
    model: type[T.PreTrainedModel],
    vision: Callable[[], T.PretrainedConfig],
    text: Callable[[], T.PretrainedConfig],
    inputs: Callable[[], dict[str, torch.Tensor]],
    **options: object,
) -> _Vlm:
    """The :class:`_Vlm` of ``model`` whose config is its config class built from fresh ``vision()`` and
    ``text()`` configs and ``options``."""
    return _Vlm(model, lambda: model.config_class(vision_config=vision(), text_config=text(), **options), inputs)


VLMS = {
    "llava": _vlm(
        T.LlavaForConditionalGeneration,
        lambda: T.CLIPVisionConfig(**VISION, projection_dim=32),
        lambda: T.LlamaConfig(**TXT),
        lambda: _image_prompt(16, (1, 3, 32, 32)),
        image_token_index=IMG,
        image_seq_length=16,
    ),
    "llava_next": _vlm(
        T.LlavaNextForConditionalGeneration,
        lambda: T.CLIPVisionConfig(**VISION, projection_dim=32),
        lambda: T.LlamaConfig(**TXT),
        lambda: _image_prompt(36, (1, 2, 3, 32, 32), image_sizes=torch.tensor([[32, 32]])),
        image_token_index=IMG,
        image_grid_pinpoints=_PINPOINTS,
        image_seq_length=16,
    ),
    "llava_onevision": _vlm(
        T.LlavaOnevisionForConditionalGeneration,
        lambda: T.SiglipVisionConfig(**VISION),
        lambda: T.Qwen2Config(**TXT),
        lambda: _image_prompt(36, (1, 2, 3, 32, 32), image_sizes=torch.tensor([[32, 32]])),
        image_token_index=IMG,
        video_token_index=501,
        image_grid_pinpoints=_PINPOINTS,
    ),
    "qwen2_vl": _Vlm(
        T.Qwen2VLForConditionalGeneration,
        lambda: _qwen_vl_config(T.Qwen2VLConfig, T.Qwen2Config, T.Qwen2VLVisionConfig(**_QWEN2_VL_VISION)),
        _qwen_vl_inputs,
    ),
    "qwen2_5_vl": _Vlm(
        T.Qwen2_5_VLForConditionalGeneration,
        lambda: _qwen_vl_config(
            T.Qwen2_5_VLConfig, T.Qwen2_5_VLTextConfig, T.Qwen2_5_VLVisionConfig(**_QWEN2_5_VL_VISION)
        ),
        _qwen_vl_inputs,
    ),
    "idefics3": _vlm(
        T.Idefics3ForConditionalGeneration,
        lambda: T.Idefics3VisionConfig(**VISION),
        lambda: T.LlamaConfig(**TXT),
        lambda: _image_prompt(4, (1, 1, 3, 32, 32)),
        image_token_id=IMG,
        scale_factor=2,
    ),
    "gemma3": _vlm(
        T.Gemma3ForConditionalGeneration,
        lambda: T.SiglipVisionConfig(**VISION),
        lambda: T.Gemma3TextConfig(**TXT, query_pre_attn_scalar=16, sliding_window=8),
        _gemma3_inputs,
        mm_tokens_per_image=4,
        boi_token_index=502,
        eoi_token_index=503,
        image_token_index=IMG,
    ),
    "paligemma": _vlm(
        T.PaliGemmaForConditionalGeneration,
        lambda: T.SiglipVisionConfig(**VISION, projection_dim=64),
        lambda: T.GemmaConfig(**TXT),
        _paligemma_inputs,
        image_token_index=IMG,
        vocab_size=V,
        projection_dim=64,
        hidden_size=64,
    ),
    "internvl": _vlm(
        T.InternVLForConditionalGeneration,
        lambda: T.InternVLVisionConfig(**dict(VISION, image_size=[32, 32], patch_size=[8, 8])),
        lambda: T.Qwen2Config(**TXT),
        lambda: _image_prompt(4, (1, 3, 32, 32)),
        image_token_id=IMG,
        image_seq_length=4,
        downsample_ratio=0.5,
    ),
    "mllama": _vlm(
        T.MllamaForConditionalGeneration,
        lambda: T.MllamaVisionConfig(
            **_MLLAMA_VISION,
            num_global_layers=1,
            vision_output_dim=64,
            max_num_tiles=1,
            intermediate_layers_indices=[0],
            supported_aspect_ratios=[[1, 1]],
        ),
        lambda: T.MllamaTextConfig(**_MLLAMA_TEXT, num_hidden_layers=3, cross_attention_layers=[1]),
        _mllama_inputs,
        image_token_index=V,
    ),
}


def build_vlm(name: str, attn: str = "sdpa", seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(model in eval mode, inputs) of a tiny random VLM, seeded; inputs: input_ids [1, L] int64 holding the
    image tokens, pixel_values float32 and the model's other image inputs."""
    torch.manual_seed(seed)
    spec = VLMS[name]
    model = spec.model(spec.config()).eval()
    inputs = spec.inputs()
    model.set_attn_implementation(attn)
    return model, inputs


def build_text(name: str, attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A tiny random causal LM in eval mode, seeded."""
    torch.manual_seed(seed)
    model = TEXT_MODELS[name]().eval()
    model.set_attn_implementation(attn)
    return model
