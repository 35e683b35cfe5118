"""Input validation shared by every op: errors that name the argument, what was expected and what came."""

from __future__ import annotations

import math
import numbers

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
    check_heads(H, Hkv)
    if H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the key/value heads ({Hkv})")
    if q.shape[1] == 0 or k.shape[1] == 0:
        raise ValueError(f"sequence length must be >= 1, got q {tuple(q.shape)}, k {tuple(k.shape)}")
    check_head_dims(q, v)
    return H, Hkv


def check_head_dims(q: torch.Tensor, v: torch.Tensor) -> None:
    """A head dim is configuration, like H: D = 0 is refused (and D ** -0.5 is undefined)."""
    if q.shape[-1] == 0 or v.shape[-1] == 0:
        raise ValueError(f"head dims must be >= 1, got q/k {q.shape[-1]} and v {v.shape[-1]}")


def check_heads(H: int, Hkv: int | None = None) -> None:
    """Heads are a model dimension: zero heads is a configuration error (and H / Hkv, the group size of
    grouped-query attention, has no value), not an empty batch."""
    if H < 1 or (Hkv is not None and Hkv < 1):
        got = f"H={H}" if Hkv is None else f"H={H} query heads and Hkv={Hkv} key/value heads"
        raise ValueError(f"attention needs at least one head (H >= 1), got {got}")


def check_number(name: str, value, *, low: float | None = None, high: float | None = None) -> float:
    """A finite real number (not a bool) in [low, high]; returns it as a float. NaN fails every comparison,
    so a plain ``value < low`` would let it through."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and value < low) or (high is not None and value > high):
        limits = [f" {sign} {bound:g}" for sign, bound in ((">=", low), ("<=", high)) if bound is not None]
        raise ValueError(f"{name} must be a number{' and'.join(limits)} (finite), got {value!r}")
    return value


def check_scale(scale) -> None:
    """A query/score scale: None (the op's default, D ** -0.5) or a finite number > 0.

    A scale is a temperature: 0 ignores the queries and a negative one is the same as passing -q, neither
    has a use in the papers implemented here, and SDPA/flex apply the mask before the scale (-inf * 0 is
    NaN, -inf * -1 is +inf), so they are refused for every op rather than accepted by some paths."""
    if scale is None:
        return
    if not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0 (or None for D ** -0.5), got {scale!r}")


def check_finite_future(op: str, q_len: int, **tensors: torch.Tensor | None) -> None:
    """Causal ops: refuse a non-finite value in a token that some query sees only in its future.

    tensors: (B, S, ...) with time along dim 1 (keys, values, ... ), queries bottom-right aligned, so the
    last ``q_len - 1`` positions are in the future of the first query and every earlier one is in every
    query's past; only those are read (a decoding step, q_len = 1, reads nothing). Matmul-based paths
    (SDPA, chunked linear attention) multiply a masked entry by 0 and 0 * NaN is NaN: no mask can keep such
    a token out of earlier outputs, so it is refused. One reduction and one host sync for all tensors;
    skipped under torch.compile, as the gate checks.
    """
    if torch.compiler.is_compiling() or q_len < 2:
        return
    future = {name: t[:, t.shape[1] - q_len + 1 :] for name, t in tensors.items() if t is not None}
    if not any(t.numel() for t in future.values()):
        return
    finite = torch.stack([torch.isfinite(t).all() for t in future.values()]).tolist()
    bad = [name for name, ok in zip(future, finite) if not ok]
    if bad:
        raise ValueError(
            f"{op}: {' and '.join(bad)} must be finite in the last {q_len - 1} positions, which earlier "
            f"queries see as future: masked products (0 * NaN = NaN) would carry such a token into earlier "
            f"outputs, so causal ops refuse it"
        )


def check_attention_values(op: str, q_len: int, *, scale=None, causal: bool = True, **future) -> None:
    """The value rules of an attention op: its ``scale`` (:func:`check_scale`) and, when causal, no
    non-finite token among ``future`` (B, S, ...) where some query would see it as future
    (:func:`check_finite_future`)."""
    check_scale(scale)
    if causal:
        check_finite_future(op, q_len, **future)


def check_causal(op: str, causal, q: torch.Tensor, k: torch.Tensor) -> None:
    """``causal`` is a bool; causal queries (bottom-right aligned) need at least as many keys (B, S, ...)
    as there are queries (B, T, ...)."""
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and k.shape[1] < q.shape[1]:
        raise ValueError(
            f"causal {op} needs at least as many keys as queries, got {q.shape[1]} queries and {k.shape[1]} keys"
        )


def check_log_gate(name: str, g: torch.Tensor, check_values: bool = True) -> None:
    """Decays are passed in log space: every value must be <= 0 (and finite). One host sync: a linear op
    checks its gates on every decoding step."""
    if check_values and not torch.compiler.is_compiling() and g.numel():
        finite, top = torch.stack([torch.isfinite(g).all().to(g.dtype), g.max()]).tolist()
        if not finite:
            raise ValueError(f"{name} (log decay) must be finite, found inf or NaN")
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
    check_head_dims(q, v)
    if k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"q and k must have one shape (B, H, W, h, D) and v the same (B, H, W, h): got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
