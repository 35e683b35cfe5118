"""Small pieces shared by the Triton kernels: the matmul precision per dtype, a dot that works under
the interpreter, and the host side of the chunked linear-attention kernels."""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from gatelab.ops.common.checks import check_cu_seqlens
from gatelab.ops.common.varlen import run_packed


def dot_precision(x: torch.Tensor) -> str:
    """The ``PRECISION`` constexpr for :func:`dot`.

    fp32 inputs are compared with the fp32 reference at 1e-4, which TF32 would not meet, so they use IEEE
    fp32 products. Under TRITON_INTERPRET=1 (tests on CPU) tl.dot on bf16/fp16 operands returns garbage in
    triton 3.9's interpreter, so the operands are widened to fp32 there ("upcast"); they were already
    rounded to the input dtype, so the tests still see the low-precision inputs.
    """
    if not x.is_cuda:
        return "upcast"
    return "ieee" if x.dtype == torch.float32 else "tf32"


@triton.jit
def dot(a, b, PRECISION: tl.constexpr):
    """tl.dot(a, b) accumulated in fp32 (see dot_precision for PRECISION)."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_f32(a, b, PRECISION: tl.constexpr):
    """tl.dot on operands widened to fp32 (TF32 tensor cores for low-precision inputs on a GPU): for
    products whose rounding to bf16 would be amplified later, e.g. by a cancellation."""
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PRECISION)


def run_chunked(
    one: Callable,
    tensors: tuple[torch.Tensor, ...],
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    chunk_range: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Host side of a chunked linear-attention kernel: ``one(*tensors, scale=, initial_state=,
    output_final_state=, chunk_size=)`` runs one batch.

    tensors start with q (B, T, H, K); ``scale`` defaults to K ** -0.5; ``chunk_size`` (a positive int) is
    rounded up to a power of two in ``chunk_range`` (the kernels need one; it changes only speed, never
    the function); with ``cu_seqlens`` (N+1,) each packed sequence runs separately from its own state.
    """
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    q = tensors[0]
    low, high = chunk_range
    options = dict(
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        chunk_size=min(high, max(low, triton.next_power_of_2(chunk_size))),
    )
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1])
        return run_packed(one, cu_seqlens, tensors, initial_state, output_final_state, **options)
    return one(*tensors, initial_state=initial_state, output_final_state=output_final_state, **options)
