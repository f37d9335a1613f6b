"""zipvl_compile: a torch.compile backend applying ZipVL to Hugging Face decoders.

``torch.compile(model, backend="zipvl", options={...})`` rewrites every decoder self-attention site of the
traced graph into zipvl ops; :func:`report` tells what was rewritten, what was left alone and why.
``TORCH_LOGS="zipvl"`` (``"+zipvl"`` for debug) shows what the passes matched and why a site was left alone
(logger ``zipvl``; torch finds the name as the top-level ``zipvl`` package, the log namespace: see
:mod:`zipvl_compile.logs`).
"""

from zipvl_compile.api import compile
from zipvl_compile.backend import register as _register
from zipvl_compile.backend import zipvl_backend
from zipvl_compile.config import ZipVLConfig
from zipvl_compile.logs import register as _register_log
from zipvl_compile.model_parts import language_model
from zipvl_compile.report import CompileReport, report, reset_report
from zipvl_compile.runtime.cache import ZipVLCache
from zipvl_compile.runtime.pytree import register as _register_pytree

_register()
_register_log()
_register_pytree()

__all__ = [
    "CompileReport",
    "ZipVLCache",
    "ZipVLConfig",
    "compile",
    "language_model",
    "report",
    "reset_report",
    "zipvl_backend",
]
