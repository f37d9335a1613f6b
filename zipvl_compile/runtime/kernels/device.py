"""What the kernels ask of the device: whether a call runs its Triton kernel, how many SMs there are, whether a
host read of a tensor's value costs nothing (:func:`host_reads_are_free`), and whether a launch parameter is a
size a kernel can take (:func:`check_power_of_two`).

Every public kernel entry point takes ``use_triton: bool | None``: None means "Triton on CUDA tensors, the
plain-torch reference elsewhere"; True on CPU tensors runs the kernel under the Triton interpreter (it needs
``TRITON_INTERPRET=1`` set before the kernel modules were imported, as the tests do).
"""

from __future__ import annotations

import torch

# The SM count assumed under the Triton interpreter (no device to ask): that of an H100 / H200, so that the
# split logic tested on a CPU is the one that runs on those GPUs.
INTERPRETER_SMS = 132


def wants_triton(x: torch.Tensor, use_triton: bool | None) -> bool:
    """Whether a kernel entry point called on ``x`` runs its Triton kernel (see the module docstring)."""
    return x.is_cuda if use_triton is None else use_triton


def host_reads_are_free(x: torch.Tensor) -> bool:
    """Reading a value of ``x`` on the host syncs nothing and breaks no trace: a CPU tensor, run eagerly."""
    return not x.is_cuda and not torch.compiler.is_compiling()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (CUDA), or :data:`INTERPRETER_SMS` for a CPU tensor. Traced by
    Dynamo as a constant (a launcher that asks it may run inside ``torch.compile``)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device.index)


_SM_COUNTS: dict[int, int] = {}


@torch._dynamo.assume_constant_result
def _cuda_sm_count(index: int | None) -> int:
    index = torch.cuda.current_device() if index is None else index
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


def check_power_of_two(owner: str, name: str, value: int, least: int = 1) -> None:
    """Raise ValueError naming ``owner.name`` unless ``value`` is a power of two >= ``least`` (tile sizes and warp
    counts of the kernels' launch parameters)."""
    if value < least or value & (value - 1):
        raise ValueError(f"{owner}.{name} must be a power of two >= {least}, got {value}")
