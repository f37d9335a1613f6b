"""The package's logger name, and its registration with torch's logging.

The backend and the passes log through ``logging.getLogger(LOG_NAME)``. ``TORCH_LOGS="zipvl"`` / ``"+zipvl"``
enable it at INFO / DEBUG: torch parses ``TORCH_LOGS`` while it is imported, before this package is, and takes
an unknown name as a module name, so it finds the top-level ``zipvl`` package (the log namespace, empty) and
registers the log itself. Otherwise :func:`register` does, so that ``TORCH_LOGS=help`` lists the name.
``torch._logging.set_logs(modules={"zipvl": logging.DEBUG})`` enables it from code (``set_logs`` has a fixed
set of keywords: ``zipvl=`` is a TypeError; and it does nothing while ``TORCH_LOGS`` is set).
"""

from __future__ import annotations

from torch._logging import _internal as torch_logging

LOG_NAME = "zipvl"


def register() -> None:
    """Register ``LOG_NAME`` as a torch log of that name, unless ``TORCH_LOGS`` (or an earlier call) did."""
    if not torch_logging.log_registry.is_log(LOG_NAME):
        torch_logging.register_log(LOG_NAME, LOG_NAME)
