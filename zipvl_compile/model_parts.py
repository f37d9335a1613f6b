"""The parts of a Hugging Face model that zipvl compiles or leaves alone: the language model, the vision tower."""

from __future__ import annotations

import torch


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
