"""What the linear-attention ops share at their entry: the checks of cu_seqlens, initial_state and
chunk_size, and whether an op's Triton backend can run."""

from __future__ import annotations

import importlib.util

import torch

from gatelab.ops.common.backend import triton_available
from gatelab.ops.common.checks import check_cu_seqlens, check_tensor


def check_linear_options(
    op: str,
    q: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> None:
    """Checks every linear-attention op shares: cu_seqlens, initial_state (B or N, H, K, V), chunk_size."""
    B, T, H, K = q.shape
    check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        check_tensor("initial_state", initial_state, 4, "(B, H, K, V)")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        expected = (n, H, K, v.shape[-1])
        if tuple(initial_state.shape) != expected:
            who = "N sequences" if cu_seqlens is not None else "B"
            raise ValueError(
                f"{op}: initial_state must have shape (B or N, H, K, V) = {expected} ({who}), "
                f"got {tuple(initial_state.shape)}"
            )
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def triton_ready(package: str, q: torch.Tensor) -> bool:
    """Triton kernels can run on q (CUDA, or TRITON_INTERPRET=1) and the op ``package`` has its
    ``triton`` module."""
    return triton_available(q) and importlib.util.find_spec(package + ".triton") is not None


__all__ = ["check_linear_options", "triton_ready"]
