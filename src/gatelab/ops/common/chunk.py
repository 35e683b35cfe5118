"""Chunk utilities for chunkwise-parallel linear attention: cut (B, T, H, D) into chunks, stable decay
products inside a chunk, the sequential scan of chunk states and what it carries across chunks, and
decay-free causal linear attention.

Numerical rule: decays live in log space and every factor we exponentiate is a difference b_i - b_j with
i at or after j, so it is <= 0 and exp() never overflows. Cumulative log decays are always taken *within*
a chunk (Gated Linear Attention Transformers with Hardware-Efficient Training (Yang et al., 2023), sec. 4),
never across the whole sequence, so they stay small enough for fp32. A log decay below
``LOG_DECAY_FLOOR`` is raised to it before the sum (see there): a closed gate such as
``torch.finfo(torch.float32).min`` would otherwise make two such sums -inf and their difference NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# exp() of anything below -103.98 is exactly 0 in fp32 (the smallest subnormal is exp(-103.3)), and the
# chunked forms run in fp32: a log decay raised to the floor multiplies the state by the same 0, so the
# function does not change. What changes is that a chunk's cumulative sum of such decays stays finite
# (k * -110 for k closed gates rather than -inf, whose differences -inf - -inf are NaN), so a closed gate
# (torch.finfo(torch.float32).min) gives the reference's result. Every difference b_i - b_j that spans a
# floored decay is <= -110, and the margin of 6 past the underflow covers the rounding of sums up to ~1e7,
# so its exp() is still exactly 0. Exact in every float dtype. Precision is that of any strong gate: each
# closed token adds 110 to the within-chunk sums (GLA, B=2 T=256 H=2 K=V=32, randn q/k/v, logsigmoid(randn)
# gates with every other token closed, C=64, seed 0: 2.5e-5 relative RMS against the reference, 2.7e-5 with
# a floor of -128).
LOG_DECAY_FLOOR = -110.0

GROUP_ELEMENTS = 2**21  # ~8 MB of fp32 per intra-chunk temporary: see chunk_groups


def chunk_length(chunk_size: int, T: int) -> int:
    """The chunk length to run: ``chunk_size``, or T rounded up to a power of two when that is shorter.

    Past T a chunk holds only padding, the same function in more memory (chunk_size=10**6 would allocate
    terabytes); a power of two keeps the divisors GLA's sub-chunks need and leaves every power-of-two
    chunk_size as it was."""
    return min(chunk_size, 1 << max(0, T - 1).bit_length())


def chunk_groups(per_chunk: int) -> int:
    """How many chunks to process at once so that a temporary of ``per_chunk`` elements per chunk stays near
    GROUP_ELEMENTS: past the allocator's mmap threshold every temporary would be fresh pages from the OS
    (GLA's time grew ~9x from T=2048 to 8192 instead of ~4x). At least 1, also for an empty batch."""
    return max(1, GROUP_ELEMENTS // max(1, per_chunk))


def pad_time(x: torch.Tensor, chunk_size: int, value: float = 0.0) -> torch.Tensor:
    """Pad dim 1 (time) of x (B, T, ...) at the end up to a multiple of ``chunk_size``.

    Padding with zeros is neutral for linear attention: a zero key/value adds nothing to the state and a
    zero log decay (decay 1) leaves it unchanged, so outputs and the final state are exact.
    """
    T = x.shape[1]
    pad = (-T) % chunk_size
    if pad == 0:
        return x
    widths = [0, 0] * (x.ndim - 2) + [0, pad]  # F.pad counts from the last dim
    return F.pad(x, widths, value=value)


def to_chunks(x: torch.Tensor, chunk_size: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """(B, T, H, D) -> (B, H, N, C, D) with N = ceil(T / C), zero-padded; (B, T, H) -> (B, H, N, C).

    Cast to ``dtype`` (fp32 by default: chunk sums and decays are accumulated in fp32).
    """
    x = pad_time(x if dtype is None else x.to(dtype), chunk_size)
    B, Tp, H = x.shape[:3]
    x = x.view(B, Tp // chunk_size, chunk_size, H, *x.shape[3:])  # (B, N, C, H, ...)
    return x.movedim(3, 1)  # (B, H, N, C, ...)


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """(B, H, N, C, D) -> (B, T, H, D), dropping the padding."""
    B, H, N, C = x.shape[:4]
    x = x.movedim(1, 3).reshape(B, N * C, H, *x.shape[4:])  # (B, N*C, H, D)
    return x[:, :T]


def chunk_qkv(q, k, v, chunk_size: int, scale: float | None):
    """q (scaled, default K ** -0.5), k, v (B, T, H, *) -> chunks (B, H, N, C, *) in fp32. k and v are made
    contiguous: CPU matmuls on the strided (B, T, H, D) layout are several times slower."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qc = to_chunks(q, chunk_size) * scale
    return qc, to_chunks(k, chunk_size).contiguous(), to_chunks(v, chunk_size).contiguous()


def chunk_cumsum(g: torch.Tensor, dim: int = 3) -> torch.Tensor:
    """Inclusive cumulative sum of log decays within each chunk (along the C dim, ``dim`` of
    (B, H, N, C[, K])), in fp32: b_t = g_1 + ... + g_t of that chunk, so b is non-increasing and <= 0.
    Decays below LOG_DECAY_FLOOR count as the floor (the same factor 0, a finite sum)."""
    return g.float().clamp(min=LOG_DECAY_FLOOR).cumsum(dim)


def causal_decay_matrix(b: torch.Tensor) -> torch.Tensor:
    """Scalar decays: (..., C) within-chunk cumulative log decay -> (..., C, C) with
    entry [i, j] = exp(b_i - b_j) for j <= i and 0 above the diagonal.

    The mask goes on *before* exp: above the diagonal b_i - b_j > 0 could overflow (and 0 * inf = NaN).
    """
    C = b.shape[-1]
    diff = b[..., :, None] - b[..., None, :]  # (..., C, C)
    causal = torch.ones(C, C, dtype=torch.bool, device=b.device).tril()
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def pairwise_decay(b: torch.Tensor) -> torch.Tensor:
    """Vector decays: (..., c, K) cumulative log decay -> (..., c, c, K), [i, j, k] = exp(b_ik - b_jk) for
    j <= i and 0 above the diagonal; masked before exp as :func:`causal_decay_matrix`.

    Memory is c * c * K per block of c tokens, so call it on short sub-chunks (c = 8 or 16)."""
    c = b.shape[-2]
    diff = b[..., :, None, :] - b[..., None, :, :]  # (..., c, c, K)
    causal = torch.ones(c, c, dtype=torch.bool, device=b.device).tril()[:, :, None]
    return torch.exp(diff.masked_fill(~causal, float("-inf")))


def scan_states(
    increments: torch.Tensor,
    decays: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The only sequential part of a chunked linear attention: S_{n+1} = decay_n * S_n + U_n.

    increments: U (B, H, N, K, V), what chunk n adds to the state (already decayed to the chunk's end).
    decays: (B, H, N, K, 1) key-wise or (B, H, N, 1, 1) scalar decays over a whole chunk (not logs), <= 1.
    initial_state: (B, H, K, V) or None (zeros).
    Returns the states *entering* each chunk (B, H, N, K, V) and the final state (B, H, K, V), fp32.
    """
    B, H, N, K, V = increments.shape
    state = increments.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    before = []
    # unbind once: indexing [:, :, n] in the loop would make autograd write each step's gradient into a
    # fresh zero tensor of the full (B, H, N, K, V) size, O(N^2) work in the backward pass
    for decay, increment in zip(decays.unbind(2), increments.unbind(2)):
        before.append(state)
        state = decay * state + increment
    return torch.stack(before, dim=2), state


def carry_across_chunks(
    qc: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    b: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inter-chunk part of a chunked linear attention with decay: what each chunk adds to the state
    (decayed to the chunk's end), the scan of chunk states, and what the earlier chunks give each query.

    qc (already scaled), kc: (B, H, N, C, K); vc: (B, H, N, C, V); b: within-chunk cumulative log decay,
    (B, H, N, C, K) key-wise or (B, H, N, C, 1) one per head and token; initial_state: (B, H, K, V) or None.
    Returns o (B, H, N, C, V), the output from the states entering each chunk, and the final state
    (B, H, K, V), fp32.
    """
    b_last = b[..., -1:, :]  # (B, H, N, 1, K|1)
    increments = (kc * torch.exp(b_last - b)).transpose(-1, -2) @ vc  # (B, H, N, K, V)
    states, final = scan_states(increments, torch.exp(b_last).transpose(-1, -2), initial_state)
    return (qc * torch.exp(b)) @ states, final  # (B, H, N, C, V)


def decayed_chunk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_decay: torch.Tensor,
    intra: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    per_chunk: Callable[[int], int],
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked linear attention with a decay, the frame GLA and Lightning share: fp32 chunks, within-chunk
    cumulative log decays, the carry across chunks, and the intra-chunk scores a group of chunks at a time.

    Args:
        q, k: (B, T, H, K); v: (B, T, H, V).
        log_decay: (B, T, H, K) key-wise or (B, T, H) one per head and token, <= 0.
        intra: (qc, kc, b) of a group of chunks, (B, H, n, C, K) and b (B, H, n, C[, K]) -> the causal
            decayed scores (B, H, n, C, C); q is already scaled.
        per_chunk: C -> elements of intra's largest temporary per chunk (see :func:`chunk_groups`).
        initial_state: (B, H, K, V) or None; chunk_size: tokens per chunk (see :func:`chunk_length`).
    Returns:
        o (B, T, H, V) in q's dtype and the final state (B, H, K, V) fp32.
    """
    T = q.shape[1]
    C = chunk_length(chunk_size, T)
    qc, kc, vc = chunk_qkv(q, k, v, C, scale)  # (B, H, N, C, K), (B, H, N, C, K), (B, H, N, C, V) fp32
    b = chunk_cumsum(to_chunks(log_decay, C))  # (B, H, N, C[, K]), <= 0, non-increasing in C
    # Inter-chunk: what each chunk adds to the state, decayed to its end; then the sequential scan.
    o, final = carry_across_chunks(qc, kc, vc, b if b.ndim == 5 else b[..., None], initial_state)
    group = chunk_groups(per_chunk(C))
    pieces = zip(*(x.split(group, dim=2) for x in (qc, kc, b, vc)))
    o = o + torch.cat([intra(qg, kg, bg) @ vg for qg, kg, bg, vg in pieces], dim=2)  # (B, H, N, C, V)
    return from_chunks(o, T).to(q.dtype), final


def causal_linear_attention_chunk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal linear attention without decay, o_t = q_t (S_0 + sum_{s<=t} k_s^T v_s), in chunks of
    ``chunk_size`` tokens, with autograd.

    Args:
        q, k: (B, T, H, K) fp32 (already through the feature map).
        v: (B, T, H, V) fp32.
        initial_state: (B, H, K, V) fp32 or None.
    Returns:
        o (B, T, H, V) and the final state (B, H, K, V), both fp32.
    """
    T = q.shape[1]
    C = min(chunk_size, T)
    # zero-padded keys and values add nothing to any state
    qc, kc, vc = (to_chunks(x, C, dtype=None) for x in (q, k, v))  # (B, H, N, C, K), v: (B, H, N, C, V)
    mask = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~mask, 0.0)  # (B, H, N, C, C) inside each chunk
    o = scores @ vc  # (B, H, N, C, V)
    kv = kc.transpose(-1, -2) @ vc  # (B, H, N, K, V): each chunk's contribution
    inclusive = kv.cumsum(dim=2)
    before = torch.cat(
        [torch.zeros_like(kv[:, :, :1]), inclusive[:, :, :-1]], dim=2
    )  # state entering chunk n
    final = inclusive[:, :, -1]
    if initial_state is not None:
        before = before + initial_state[:, :, None]
        final = final + initial_state
    o = o + qc @ before
    return from_chunks(o, T), final  # (B, T, H, V)


def global_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bidirectional: o_t = q_t sum_s k_s^T v_s. q, k (B, T, H, K), v (B, T, H, V) -> (B, T, H, V)."""
    kv = torch.einsum("bshk,bshv->bhkv", k, v)  # (B, H, K, V)
    return torch.einsum("bthk,bhkv->bthv", q, kv)


__all__ = [
    "LOG_DECAY_FLOOR",
    "GROUP_ELEMENTS",
    "chunk_length",
    "chunk_groups",
    "decayed_chunk_attention",
    "pad_time",
    "to_chunks",
    "from_chunks",
    "chunk_cumsum",
    "causal_decay_matrix",
    "pairwise_decay",
    "scan_states",
    "carry_across_chunks",
    "causal_linear_attention_chunk",
    "global_linear_attention",
]
