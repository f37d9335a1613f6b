"""KV quantiser entry points: the Triton kernel on CUDA tensors, the plain-torch reference elsewhere.

Layout: :mod:`zipvl_compile.runtime.layout`. Arithmetic and references:
:mod:`zipvl_compile.runtime.kernels.quant_reference`. Triton twins (same signatures, ``_triton`` suffix):
:mod:`zipvl_compile.runtime.kernels.quant`. ``use_triton`` overrides the choice (tests run the kernels on CPU
tensors under the Triton interpreter). Without Triton, a segment write on CPU tensors takes the CPU path
:mod:`zipvl_compile.runtime.kernels.quant_cpu` (the reference's bits, host reads and written slots only).
"""

from __future__ import annotations

import torch

from zipvl_compile.runtime.kernels import quant as kernels
from zipvl_compile.runtime.kernels import quant_reference as reference
from zipvl_compile.runtime.kernels.device import wants_triton
from zipvl_compile.runtime.kernels.quant_cpu import write_segment_cpu_
from zipvl_compile.runtime.layout import Segment


def quantize_keys(
    k: torch.Tensor, valid: torch.Tensor, bits: int, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`~zipvl_compile.runtime.kernels.quant_reference.quantize_keys_reference`."""
    impl = kernels.quantize_keys_triton if wants_triton(k, use_triton) else reference.quantize_keys_reference
    return impl(k, valid, bits)


def quantize_values(
    v: torch.Tensor, bits: int, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """See :func:`~zipvl_compile.runtime.kernels.quant_reference.quantize_values_reference`."""
    impl = kernels.quantize_values_triton if wants_triton(v, use_triton) else reference.quantize_values_reference
    return impl(v, bits)


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    dtype: torch.dtype,
    *,
    keys: bool,
    use_triton: bool | None = None,
) -> torch.Tensor:
    """Keys (``keys=True``) or values back to ``dtype``; see ``dequantize_keys_reference`` /
    ``dequantize_values_reference`` in :mod:`~zipvl_compile.runtime.kernels.quant_reference`."""
    if wants_triton(codes, use_triton):
        impl = kernels.dequantize_keys_triton if keys else kernels.dequantize_values_triton
    else:
        impl = reference.dequantize_keys_reference if keys else reference.dequantize_values_reference
    return impl(codes, scale, zero, bits, dtype)


def write_segment_(
    seg: Segment,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    take: torch.Tensor,
    src_pos: torch.Tensor,
    bits: int,
    use_triton: bool | None = None,
) -> None:
    """See :func:`~zipvl_compile.runtime.kernels.quant_reference.write_segment_reference_`."""
    if wants_triton(k_new, use_triton):
        impl = kernels.write_segment_triton_
    elif k_new.device.type == "cpu":
        impl = write_segment_cpu_
    else:
        impl = reference.write_segment_reference_
    impl(seg, k_new, v_new, take, src_pos, bits)
