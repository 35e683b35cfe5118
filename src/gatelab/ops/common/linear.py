"""What the linear-attention ops share at their entry: the checks of cu_seqlens, initial_state and
chunk_size, whether an op's Triton backend can run, picking a backend and running it on packed sequences."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping

import torch

from gatelab.ops.common.backend import resolve_backend, triton_available
from gatelab.ops.common.checks import check_cu_seqlens, check_tensor
from gatelab.ops.common.varlen import run_packed


def check_linear_options(
    op: str,
    q: torch.Tensor,
    v: torch.Tensor,
    initial_state: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int | None,
    extra_columns: int = 0,
) -> None:
    """Checks every linear-attention op shares: cu_seqlens, initial_state (B or N, H, K, V + extra_columns)
    (LINA carries its normaliser in one more column), chunk_size (None: the backend's own default)."""
    B, T, H, K = q.shape
    check_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        V = f"V+{extra_columns}" if extra_columns else "V"
        check_tensor("initial_state", initial_state, 4, f"(B, H, K, {V})")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state is on {initial_state.device} but q is on {q.device}")
        n = B if cu_seqlens is None else cu_seqlens.numel() - 1
        expected = (n, H, K, v.shape[-1] + extra_columns)
        if tuple(initial_state.shape) != expected:
            who = "N sequences" if cu_seqlens is not None else "B"
            raise ValueError(
                f"{op}: initial_state must have shape (B or N, H, K, {V}) = {expected} ({who}), "
                f"got {tuple(initial_state.shape)}"
            )
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


def triton_ready(package: str, q: torch.Tensor) -> bool:
    """Triton kernels can run on q (CUDA, or TRITON_INTERPRET=1) and the op ``package`` has its
    ``triton`` module."""
    return triton_available(q) and importlib.util.find_spec(package + ".triton") is not None


def pick_backend(
    op: str,
    backend: str,
    q: torch.Tensor,
    functions: Mapping[str, Callable | None],
    auto_order: tuple[str, ...] = ("triton", "chunk"),
) -> tuple[str, Callable]:
    """The backend of linear op ``op`` to run and its function.

    functions: backend name -> function; the PyTorch backends run anywhere. None stands for the Triton
    kernels, ``gatelab.ops.<op>.triton.<op>_triton``: available where :func:`triton_ready`, imported only
    when chosen (it needs triton).
    """
    package = f"gatelab.ops.{op}"
    available = {
        name: True if fn is not None else (lambda: triton_ready(package, q)) for name, fn in functions.items()
    }
    name = resolve_backend(op, backend, available, tuple(n for n in auto_order if n in functions))
    fn = functions[name]
    if fn is None:
        fn = getattr(importlib.import_module(f"{package}.triton"), f"{op}_triton")
    return name, fn


def run_backend(
    fn: Callable,
    tensors: tuple[torch.Tensor, ...],
    *,
    initial_state,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    **options,
):
    """``fn(*tensors, initial_state=, output_final_state=, **options)`` on one batch, or on each packed
    sequence with its own state when ``cu_seqlens`` is given (:func:`run_packed`): the backends themselves
    never see cu_seqlens. tensors: (B, T, ...) each, cut along T."""
    if cu_seqlens is None:
        return fn(*tensors, initial_state=initial_state, output_final_state=output_final_state, **options)
    return run_packed(fn, cu_seqlens, tensors, initial_state, output_final_state, **options)


def run_linear(
    op: str,
    backend: str,
    functions: Mapping[str, Callable | None],
    tensors: tuple[torch.Tensor, ...],
    *,
    chunk_size: int | Mapping[str, int],
    initial_state,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    auto_order: tuple[str, ...] = ("triton", "chunk"),
    **options,
):
    """What a linear op does once its inputs are checked: pick the backend (:func:`pick_backend`), give
    ``chunk_size`` to the chunked ones, "chunk" and "triton" (a mapping: each its own default), and run it
    on one batch or on each packed sequence (:func:`run_backend`). ``options`` go to every backend."""
    name, fn = pick_backend(op, backend, tensors[0], functions, auto_order)
    if name in ("chunk", "triton"):
        options["chunk_size"] = chunk_size[name] if isinstance(chunk_size, Mapping) else chunk_size
    return run_backend(
        fn, tensors, initial_state=initial_state, output_final_state=output_final_state,
        cu_seqlens=cu_seqlens, **options,
    )  # fmt: skip


__all__ = ["check_linear_options", "triton_ready", "pick_backend", "run_backend", "run_linear"]
