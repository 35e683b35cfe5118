"""Input validation shared by every op: errors that name the argument, what was expected and what came."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, x, ndim: int | tuple[int, ...] | None = None, layout: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if ndims is not None and x.ndim not in ndims:
        expected = " or ".join(str(n) for n in ndims)
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must have {expected} dims{hint}, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_same(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every tensor in ``others`` must share ``ref``'s dtype and device."""
    for name, x in others.items():
        if x is None:
            continue
        if x.device != ref.device:
            raise ValueError(
                f"{name} is on {x.device} but {ref_name} is on {ref.device}; move them to one device"
            )
        if x.dtype != ref.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; cast them to one dtype"
            )


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, same_length: bool = False
) -> tuple[int, int]:
    """Validate (B, T, H, D) q and (B, S, Hkv, D) k, (B, S, Hkv, V) v. Returns (H, Hkv)."""
    layout = "(B, T, H, D)"
    check_tensor("q", q, 4, layout)
    check_tensor("k", k, 4, layout)
    check_tensor("v", v, 4, layout)
    check_same("q", q, k=k, v=v)
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on (B, S, Hkv), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if same_length and q.shape[1] != k.shape[1]:
        raise ValueError(f"q and k must have the same length T, got {q.shape[1]} and {k.shape[1]}")
    H, Hkv = q.shape[2], k.shape[2]
    if H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence length must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    return H, Hkv


def check_log_gate(name: str, g: torch.Tensor, check_values: bool = True) -> None:
    """Decays are passed in log space: every value must be <= 0 (and finite)."""
    if check_values and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(g).all()):
            raise ValueError(f"{name} (log decay) must be finite, found inf or NaN")
        top = float(g.max()) if g.numel() else 0.0
        if top > 0:
            raise ValueError(f"{name} is a log decay and must be <= 0 everywhere, got max {top:.4g}")


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, batch: int, total: int) -> None:
    """Packed variable-length batches: int32/int64 offsets (N+1,), starting at 0, ending at T, increasing."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (N+1,) with N >= 1, got {tuple(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"batch size must be 1 when cu_seqlens is given, got {batch}")
    c = cu_seqlens.tolist()
    if c[0] != 0 or c[-1] != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={total}, got {c[0]} ... {c[-1]}")
    if any(b <= a for a, b in zip(c[:-1], c[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing, got {c}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_map_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate (B, H, W, h, D) q and k of one shape and (B, H, W, h, V) v on a 2D map, one dtype and device."""
    check_tensor("q", q, 5, "(B, H, W, h, D)")
    check_tensor("k", k, 5, "(B, H, W, h, D), as q")
    check_tensor("v", v, 5, "(B, H, W, h, V)")
    check_same("q", q, k=k, v=v)
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q and k must have one shape (B, H, W, h, D) and v the same (B, H, W, h): got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
