"""``TORCH_LOGS="zipvl"`` / ``"+zipvl"`` enable the package's logger at INFO / DEBUG through torch's logging.

Each case runs a fresh interpreter (torch reads ``TORCH_LOGS`` when it is imported) from outside the checkout,
so ``zipvl`` (the log namespace) must be found as installed, and compiles one tiny CPU graph: the pass manager
logs one INFO line per graph (what find_attention matched) and one DEBUG line per site pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch._logging import _internal as torch_logging

import zipvl_compile  # noqa: F401  (registers the log)
from zipvl_compile.logs import LOG_NAME

INFO_LINE = "graph 0: find_attention matched 0 site(s)"
DEBUG_LINE = "graph 0: locate kept 0 of 0 candidate site(s)"

COMPILE = """
import torch, zipvl_compile
f = torch.compile(lambda x: torch.sin(x) + 1, backend="zipvl", options={"inner": "eager"})
f(torch.randn(2, 3))
"""


def _run(script: str, cwd: Path, torch_logs: str | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter in ``cwd``, with ``TORCH_LOGS`` set to ``torch_logs`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCH_LOGS")}
    if torch_logs is not None:
        env["TORCH_LOGS"] = torch_logs
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    assert out.returncode == 0, out.stderr[-2000:]
    return out


@pytest.mark.parametrize(
    ("torch_logs", "info", "debug"),
    [("+zipvl", True, True), ("zipvl", True, False), (None, False, False)],
)
def test_torch_logs(tmp_path: Path, torch_logs: str | None, info: bool, debug: bool) -> None:
    err = _run(COMPILE, tmp_path, torch_logs).stderr
    assert (INFO_LINE in err) == info, err[-2000:]
    assert (DEBUG_LINE in err) == debug, err[-2000:]


def test_set_logs_modules(tmp_path: Path) -> None:
    """Without TORCH_LOGS, ``torch._logging.set_logs(modules={"zipvl": logging.DEBUG})`` enables the log."""
    script = "import logging, torch\ntorch._logging.set_logs(modules={'zipvl': logging.DEBUG})\n" + COMPILE
    err = _run(script, tmp_path).stderr
    assert INFO_LINE in err and DEBUG_LINE in err, err[-2000:]


def test_registered() -> None:
    """Importing zipvl_compile registers the log with torch (TORCH_LOGS=help lists it)."""
    assert LOG_NAME == "zipvl"
    assert torch_logging.log_registry.log_alias_to_log_qnames[LOG_NAME] == [LOG_NAME]


def test_namespace_imports_nothing(tmp_path: Path) -> None:
    """torch imports ``zipvl`` (and walks its submodules) while torch itself is being imported: it imports neither
    torch nor zipvl_compile, and has no submodules."""
    script = "import pkgutil, sys, zipvl\nassert 'torch' not in sys.modules and 'zipvl_compile' not in sys.modules\n"
    script += "assert not list(pkgutil.iter_modules(zipvl.__path__))\n"
    _run(script, tmp_path)
