"""Every image-text-to-text class of transformers 5.17, built from a tiny random config on the CPU.

A model type's default config is shrunk (every sub-config: hidden 64, 2 layers, 4 heads, 2 KV heads, head dim 16,
vocabulary 512, 4 experts), with the few per-family fixes a consistent tiny config needs (:data:`FIXES`). The
prompt is text only (input_ids [1, 7] int64): the language model's decoder sites are what the zoo checks;
image inputs are exercised by the hand-made fixtures of ``zipvl_compile.testing``.

:data:`LEFT_OUT` names the classes that are not built, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as T
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

from zipvl_compile.model_parts import language_model

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_layers=2,
    depth=2,
    encoder_layers=2,
    decoder_layers=2,
    num_attention_heads=4,
    num_heads=4,
    encoder_attention_heads=4,
    decoder_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=512,
    embed_dim=64,
    d_model=64,
    out_hidden_size=64,
    projection_dim=64,
    vision_output_dim=64,
    text_hidden_size=64,
    ffn_dim=128,
    encoder_ffn_dim=128,
    decoder_ffn_dim=128,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    n_routed_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    num_global_layers=1,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    max_position_embeddings=512,
)
PROMPT_LEN = 7


def _mrope(*section: int) -> Callable[[T.PretrainedConfig], None]:
    """Multimodal RoPE: the section sizes must add up to the tiny rotary half-dim."""

    def fix(cfg: T.PretrainedConfig) -> None:
        text = cfg.text_config
        text.rope_parameters = {**text.rope_parameters, "mrope_section": list(section)}

    return fix


def _set(**values: object) -> Callable[[T.PretrainedConfig], None]:
    """Set attributes on the text config (the top config when it has none)."""

    def fix(cfg: T.PretrainedConfig) -> None:
        text = getattr(cfg, "text_config", cfg)
        for name, value in values.items():
            setattr(text, name, value)

    return fix


def _top(**values: object) -> Callable[[T.PretrainedConfig], None]:
    """Set attributes on the top config."""

    def fix(cfg: T.PretrainedConfig) -> None:
        for name, value in values.items():
            setattr(cfg, name, value)

    return fix


def _hybrid(cfg: T.PretrainedConfig) -> None:
    """Linear-attention hybrids (every 4th layer full): keep one full-attention layer among the two."""
    cfg.text_config.layer_types = ["linear_attention", "full_attention"]


FIXES: dict[str, list[Callable[[T.PretrainedConfig], None]]] = {
    "qwen2_vl": [_mrope(2, 3, 3)],
    "qwen2_5_vl": [_mrope(2, 3, 3)],
    "paddleocr_vl": [_mrope(2, 3, 3)],
    "glm4v": [_mrope(2, 3, 3)],
    "glm46v": [_mrope(2, 3, 3)],
    "glmga": [_mrope(2, 3, 3)],
    "glm_ocr": [_mrope(2, 3, 3)],
    "glm4v_moe": [_mrope(1, 1, 2)],
    "qwen3_5": [_hybrid],
    "qwen3_5_moe": [_hybrid],
    "qwen4_exp": [_hybrid],
    "minicpmv4_6": [_hybrid],
    "hunyuan_vl": [_set(head_dim=16)],
    "qwen2_5_omni_thinker": [_mrope(2, 3, 3), _top(vision_start_token_id=502)],
    "qwen3_omni_moe_thinker": [_top(vision_start_token_id=502)],
    "step3p7": [_set(sliding_window=8)],
    "granite4_vision": [
        _top(deepstack_layer_map=[(1, 0)], downsample_rate="1/2", spatial_target_layers=[1]),
        _set(attention_multiplier=0.25, embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0),
    ],
}

_NEEDS_IMAGE = "generate() needs pixel_values: the text decoder reads the image encoder's output"
_NO_TIMM = "the vision tower is a timm model and timm is not installed"
_SHRINK = "the generic tiny config does not build or run"
LEFT_OUT: dict[str, str] = {
    "blip": _NEEDS_IMAGE,
    "blip-2": _NEEDS_IMAGE,
    "instructblip": _NEEDS_IMAGE,
    "instructblipvideo": _NEEDS_IMAGE,
    "idefics": _NEEDS_IMAGE,
    "kosmos-2": _NEEDS_IMAGE,
    "pix2struct": "encoder-decoder over image patches: generation needs flattened_patches",
    "udop": "encoder-decoder over a document image and its layout: generation needs pixel_values and bbox",
    "pp_formulanet": "encoder-decoder over a formula image: generation needs pixel_values",
    "vision-encoder-decoder": "no default config (an encoder config and a decoder config must be chosen)",
    "pi0": "an action model: no generate(), no autoregressive text decoding",
    "diffusion_gemma": "block-diffusion decoding, not autoregressive; the default config does not build",
    "fast_vlm": _NO_TIMM,
    "gemma3n": _NO_TIMM,
    "perception_lm": _NO_TIMM,
    "inkling_mm_model": f"{_SHRINK}: it still allocates 23 GB (sizes the generic shrink does not know)",
    "chameleon": f"{_SHRINK}: the config has no image-token vocabulary map",
    "emu3": f"{_SHRINK}: the config has no image-token vocabulary map",
    "cohere_compass": f"{_SHRINK}: no RoPE parameters for its full-attention layers",
    "deepseek_ocr2": f"{_SHRINK}: the default config leaves a required size unset",
    "ernie4_5_vl_moe": f"{_SHRINK}: its text/vision expert split needs per-modality sizes",
    "glm5_next": f"{_SHRINK}: its linear-attention hybrid layers need RoPE parameters per layer type",
    "hunyuan_vl": f"{_SHRINK}: its XD-RoPE sections are unset",
    "qwen4_exp": f"{_SHRINK}: the default config leaves a required size unset",
    "kimi_k25": f"{_SHRINK}: multi-head latent attention sizes of the tiny config do not line up",
    "mistral4": f"{_SHRINK}: multi-head latent attention sizes of the tiny config do not line up",
}


def zoo_names() -> list[str]:
    """One model type per image-text-to-text class (the first that names it), but those of :data:`LEFT_OUT`."""
    first: dict[str, str] = {}
    for name, cls in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.items():
        first.setdefault(cls, name)
    return [name for name in first.values() if name not in LEFT_OUT]


def zoo_groups(size: int) -> list[list[str]]:
    """:func:`zoo_names` in groups of ``size`` (one test per group keeps the test count and overhead small)."""
    names = zoo_names()
    return [names[i : i + size] for i in range(0, len(names), size)]


def shrink(cfg: T.PretrainedConfig) -> T.PretrainedConfig:
    """Shrink ``cfg`` and its sub-configs in place to the :data:`SMALL` sizes; returns ``cfg``."""
    for name, value in list(vars(cfg).items()):
        if isinstance(value, T.PretrainedConfig):
            shrink(value)
        elif name in SMALL and isinstance(value, int) and not isinstance(value, bool) and value > SMALL[name]:
            setattr(cfg, name, SMALL[name])
    layers, types = getattr(cfg, "num_hidden_layers", None), getattr(cfg, "layer_types", None)
    if isinstance(types, list) and isinstance(layers, int):
        cfg.layer_types = (types * layers)[:layers]
    vocab, pad = getattr(cfg, "vocab_size", None), getattr(cfg, "pad_token_id", None)
    if isinstance(vocab, int) and isinstance(pad, int) and pad >= vocab:
        cfg.pad_token_id = 0
    return cfg


def build_zoo(name: str, attn: str = "eager", seed: int = 0) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """(tiny model of type ``name`` in eval mode, text-only inputs: input_ids/attention_mask [1, 7] int64)."""
    if name in LEFT_OUT:
        raise ValueError(f"{name} is not in the zoo: {LEFT_OUT[name]}")
    cfg = shrink(T.AutoConfig.for_model(name))
    for fix in FIXES.get(name, []):
        fix(cfg)
    torch.manual_seed(seed)
    model = getattr(T, MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[name])(cfg).eval()
    model.set_attn_implementation(attn)
    ids = torch.randint(3, 300, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(seed))
    return model, dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def compile_target(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose forward the test compiles: the language model, its decoder for an encoder-decoder."""
    lm = language_model(model)
    if getattr(lm.config, "is_encoder_decoder", False) and lm is not model:
        return lm.get_decoder()
    return lm
