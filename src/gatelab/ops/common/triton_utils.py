"""Small pieces shared by the Triton kernels: the matmul precision per dtype and a dot that works under
the interpreter."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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
