"""Test set-up: Triton kernels run under the interpreter when no GPU is present.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a function, so it is set here, before any
kernel module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
