"""Backend selection: "auto" picks the fastest backend that computes the same function; an explicit
request for an unavailable backend raises instead of switching silently."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def triton_available(x: torch.Tensor) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (tests)."""
    import os

    if x.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return os.environ.get("TRITON_INTERPRET") == "1" and _has_triton()


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(
    op: str,
    backend: str,
    available: Mapping[str, Callable[[], bool] | bool],
    auto_order: tuple[str, ...],
) -> str:
    """Return the backend to run.

    ``available`` maps each backend this op has to whether it can run on these inputs;
    ``auto_order`` lists the backends "auto" tries, fastest first.
    """
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        import os

        for name in auto_order:
            if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
                continue  # "auto" never picks interpreted kernels: they are for tests, and slow
            ok = available[name]
            if ok() if callable(ok) else ok:
                return name
        raise RuntimeError(f"{op}: no backend among {auto_order} can run these inputs")
    if backend not in available:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of auto, {', '.join(available)}")
    ok = available[backend]
    if not (ok() if callable(ok) else ok):
        raise RuntimeError(
            f"{op}: backend {backend!r} is not available for these inputs "
            f"(e.g. triton needs a CUDA tensor or TRITON_INTERPRET=1); pass backend='auto' to choose one"
        )
    return backend
