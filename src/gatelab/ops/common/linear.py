"""What the linear-attention ops share at their entry: whether an op's Triton backend can run."""

from __future__ import annotations

import importlib.util

import torch

from gatelab.ops.common.backend import triton_available


def triton_ready(package: str, q: torch.Tensor) -> bool:
    """Triton kernels can run on q (CUDA, or TRITON_INTERPRET=1) and the op ``package`` has its
    ``triton`` module."""
    return triton_available(q) and importlib.util.find_spec(package + ".triton") is not None


__all__ = ["triton_ready"]
