"""Tiny random text models and VLMs (transformers 5.17) and their inputs, for end-to-end tests.

They live in :mod:`zipvl_compile.models` (the demo's ``--tiny-vlm`` builds them too); this module keeps the
names the tests import.
"""

from zipvl_compile.models import TEXT_MODELS, VLMS, build_text, build_vlm, language_model

__all__ = ["TEXT_MODELS", "VLMS", "build_text", "build_vlm", "language_model"]
