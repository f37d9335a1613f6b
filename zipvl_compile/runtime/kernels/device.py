"""What the kernels ask of the device: whether a call runs its Triton kernel, and how many SMs there are.

Every public kernel entry point takes ``use_triton: bool | None``: None means "Triton on CUDA tensors, the
plain-torch reference elsewhere"; True on CPU tensors runs the kernel under the Triton interpreter (it needs
``TRITON_INTERPRET=1`` set before the kernel modules were imported, as the tests do).
"""

from __future__ import annotations

import functools

import torch

# The SM count assumed under the Triton interpreter (no device to ask): that of an H100 / H200, so that the
# split logic tested on a CPU is the one that runs on those GPUs.
INTERPRETER_SMS = 132


def wants_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    """Whether a kernel entry point called on ``x`` runs its Triton kernel (see the module docstring)."""
    return x.is_cuda if use_triton is None else use_triton


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), or :data:`INTERPRETER_SMS` for a CPU tensor."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
