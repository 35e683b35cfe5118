"""Chunked Gated DeltaNet with the cross-chunk recurrence in Triton ("Gated Delta Networks: Improving
Mamba2 with Delta Rule", Yang et al., 2024; WY form from "Parallelizing Linear Transformers with the Delta
Rule over Sequence Length", Yang et al., 2024).

S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = scale * q_t S_t  (S is K x V).

Inside a chunk of L steps with gamma_t = exp(cumulative g) and Gamma_ti = gamma_t / gamma_i (i <= t):
    (I + strict_lower(diag(beta) K K^T * Gamma)) Delta = diag(beta) V - diag(beta gamma) K S_0
so Delta = u - w S_0 with u = T (beta V), w = T (beta gamma K), T the inverse of that unit lower-triangular
matrix; o = scale [(q gamma) S_0 + (Q K^T * Gamma, causal) Delta]; S_L = gamma_L S_0 + (K Gamma_L)^T Delta.
Everything per chunk is parallel over chunks and runs as batched fp32 PyTorch matmuls and a triangular
solve (with autograd); the one sequential part, S_0 of every chunk and Delta, is a Triton kernel with a
hand-written reverse kernel for its backward. Every exponential is of a difference g_t - g_i with t after i.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gatelab.ops.common.chunk import chunk_cumsum
from gatelab.ops.common.triton_utils import dot_f32, dot_precision, run_chunked


@triton.jit
def _recurrence_fwd_kernel(
    w, u, kd, dl, h0, h, delta, ht, NT, K, V,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_H0: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """For each chunk c: h[c] = state before it, Delta_c = u_c - w_c h[c], then
    state = dl_c * state + kd_c^T Delta_c. Columns of V are independent, so V splits over programs."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_l, o_k, o_v = tl.arange(0, L), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0.0)
    for c in range(NT):
        i_c = i_bh * NT + c
        tl.store(h + i_c * K * V + p_kv, b_h, mask=m_kv)
        p_lk = (i_c * L + o_l[:, None]) * K + o_k[None, :]
        p_lv = (i_c * L + o_l[:, None]) * V + o_v[None, :]
        b_w = tl.load(w + p_lk, mask=m_k[None, :], other=0.0)  # [L, BK]
        b_u = tl.load(u + p_lv, mask=m_v[None, :], other=0.0)  # [L, BV]
        b_d = b_u - dot_f32(b_w, b_h, PRECISION)
        tl.store(delta + p_lv, b_d, mask=m_v[None, :])
        b_kd = tl.load(kd + p_lk, mask=m_k[None, :], other=0.0)
        b_h = b_h * tl.load(dl + i_c) + dot_f32(tl.trans(b_kd), b_d, PRECISION)
    tl.store(ht + i_bh * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _recurrence_bwd_kernel(
    w, kd, dl, h, delta, ddelta, dh, dht, du, dw, dkd, ddl, dh0, NT, K, V, BH,
    L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, HAS_DHT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Reverse of the forward: G = gradient of the state after chunk c. dw, dkd, ddl sum over V, so each
    V block writes its share to its own slice (leading dim) and the caller adds them."""
    i_v, i_bh = tl.program_id(0), tl.program_id(1)
    o_l, o_k, o_v = tl.arange(0, L), tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_g = tl.zeros([BK, BV], tl.float32)
    if HAS_DHT:
        b_g += tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0.0)
    for r in range(NT):
        i_c = i_bh * NT + NT - 1 - r
        p_lk = (i_c * L + o_l[:, None]) * K + o_k[None, :]
        p_lv = (i_c * L + o_l[:, None]) * V + o_v[None, :]
        b_h = tl.load(h + i_c * K * V + p_kv, mask=m_kv, other=0.0)  # [BK, BV]
        b_w = tl.load(w + p_lk, mask=m_k[None, :], other=0.0)  # [L, BK]
        b_kd = tl.load(kd + p_lk, mask=m_k[None, :], other=0.0)
        b_d = tl.load(delta + p_lv, mask=m_v[None, :], other=0.0)  # [L, BV]
        b_dd = tl.load(ddelta + p_lv, mask=m_v[None, :], other=0.0) + dot_f32(b_kd, b_g, PRECISION)
        tl.store(du + p_lv, b_dd, mask=m_v[None, :])
        p_part = i_v * BH * NT * L * K + p_lk
        tl.store(dkd + p_part, dot_f32(b_d, tl.trans(b_g), PRECISION), mask=m_k[None, :])
        tl.store(dw + p_part, -dot_f32(b_dd, tl.trans(b_h), PRECISION), mask=m_k[None, :])
        tl.store(ddl + i_v * BH * NT + i_c, tl.sum(tl.sum(b_h * b_g, 1), 0))
        b_dh = tl.load(dh + i_c * K * V + p_kv, mask=m_kv, other=0.0)
        b_g = b_g * tl.load(dl + i_c) - dot_f32(tl.trans(b_w), b_dd, PRECISION) + b_dh
    tl.store(dh0 + i_bh * K * V + p_kv, b_g, mask=m_kv)


def _blocks(K: int, V: int, cuda: bool) -> tuple[int, int, dict]:
    """(BK, BV, launch options). On CUDA, V blocks of 32 with 8 warps keep the backward under Hopper's
    227 KB of shared memory with few register spills when compiled for sm_90
    (benchmarks/gpu_compile_check.py); not yet timed."""
    BK = triton.next_power_of_2(max(K, 16))
    if cuda:
        return BK, min(32, triton.next_power_of_2(max(V, 16))), dict(num_warps=8, num_stages=2)
    return BK, min(64, triton.next_power_of_2(max(V, 16))), {}


class _Recurrence(torch.autograd.Function):
    """(w, u, kd (B, H, NT, L, K|V|K) fp32, dl (B, H, NT), h0 (B, H, K, V) or None)
    -> h (B, H, NT, K, V) states before each chunk, Delta (B, H, NT, L, V), final state (B, H, K, V)."""

    @staticmethod
    def forward(ctx, w, u, kd, dl, h0, precision):
        ctx.set_materialize_grads(False)
        B, H, NT, L, K = w.shape
        V = u.shape[-1]
        BK, BV, launch = _blocks(K, V, w.is_cuda)
        w, u, kd, dl = (x.contiguous() for x in (w, u, kd, dl))
        h = torch.empty(B, H, NT, K, V, dtype=torch.float32, device=w.device)
        delta = torch.empty(B, H, NT, L, V, dtype=torch.float32, device=w.device)
        ht = torch.empty(B, H, K, V, dtype=torch.float32, device=w.device)
        h0c = h0.float().contiguous() if h0 is not None else ht
        _recurrence_fwd_kernel[(triton.cdiv(V, BV), B * H)](
            w, u, kd, dl, h0c, h, delta, ht, NT, K, V,
            L=L, BK=BK, BV=BV, HAS_H0=h0 is not None, PRECISION=precision, **launch,
        )  # fmt: skip
        ctx.save_for_backward(w, kd, dl, h, delta)
        ctx.options = (precision, h0 is not None)
        return h, delta, ht

    @staticmethod
    def backward(ctx, dh, ddelta, dht):
        w, kd, dl, h, delta = ctx.saved_tensors
        precision, has_h0 = ctx.options
        B, H, NT, L, K = w.shape
        V = delta.shape[-1]
        BK, BV, launch = _blocks(K, V, w.is_cuda)
        NV = triton.cdiv(V, BV)
        dh = torch.zeros_like(h) if dh is None else dh.float().contiguous()
        ddelta = torch.zeros_like(delta) if ddelta is None else ddelta.float().contiguous()
        du = torch.empty(B, H, NT, L, V, dtype=torch.float32, device=w.device)
        dw = torch.empty(NV, B, H, NT, L, K, dtype=torch.float32, device=w.device)
        dkd = torch.empty(NV, B, H, NT, L, K, dtype=torch.float32, device=w.device)
        ddl = torch.empty(NV, B, H, NT, dtype=torch.float32, device=w.device)
        dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=w.device)
        _recurrence_bwd_kernel[(NV, B * H)](
            w, kd, dl, h, delta, ddelta, dh, dht.float().contiguous() if dht is not None else dh0,
            du, dw, dkd, ddl, dh0, NT, K, V, B * H,
            L=L, BK=BK, BV=BV, HAS_DHT=dht is not None, PRECISION=precision, **launch,
        )  # fmt: skip
        return dw.sum(0), du, dkd.sum(0), ddl.sum(0), (dh0 if has_h0 else None), None


def _chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """(B, T, H, ...) -> (B, H, NT, L, ...) fp32, zero-padded at the end of T."""
    x = x.float().movedim(1, 2)  # (B, H, T, ...)
    pad = -x.shape[2] % L
    if pad:
        x = F.pad(x, (0, 0) * (x.ndim - 3) + (0, pad))
    return x.reshape(*x.shape[:2], x.shape[2] // L, L, *x.shape[3:])  # explicit NT: -1 fails when B = 0


def _gated_deltanet_one(q, k, v, g, beta, *, scale, initial_state, output_final_state, chunk_size):
    B, T, H, K = q.shape
    L = chunk_size
    qc, kc, vc = _chunks(q, L), _chunks(k, L), _chunks(v, L)  # (B, H, NT, L, K|V)
    # (B, H, NT, L) cumulative log decay inside each chunk, closed gates at the floor (differences of two
    # -inf sums would be NaN); padding g = 0
    gc = chunk_cumsum(_chunks(g, L), dim=-1)
    bc = _chunks(beta, L)  # padding beta = 0: padded steps change nothing
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    decay = torch.exp((gc[..., :, None] - gc[..., None, :]).masked_fill(~causal, float("-inf")))  # (.., L, L)
    kk = kc @ kc.transpose(-1, -2)  # (B, H, NT, L, L)
    eye = torch.eye(L, device=q.device)
    system = eye + (bc[..., :, None] * kk * decay).tril(-1)  # unit lower triangular
    u = torch.linalg.solve_triangular(system, bc[..., None] * vc, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(
        system, (bc * gc.exp())[..., None] * kc, upper=False, unitriangular=True
    )
    kd = kc * torch.exp(gc[..., -1:] - gc)[..., None]  # keys decayed to the chunk's end
    h, delta, ht = _Recurrence.apply(w, u, kd, gc[..., -1].exp(), initial_state, dot_precision(q))
    scores = (qc @ kc.transpose(-1, -2)) * decay  # (B, H, NT, L, L), causal inside the chunk
    o = scale * ((qc * gc.exp()[..., None]) @ h + scores @ delta)  # (B, H, NT, L, V)
    o = o.flatten(2, 3)[:, :, :T].transpose(1, 2)  # (B, T, H, V)
    return o.to(q.dtype), (ht if output_final_state else None)


def gated_deltanet_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated DeltaNet, chunked, with autograd; arguments and shapes as :func:`gatelab.ops.gated_deltanet`
    (``chunk_size`` is rounded up to a power of two in [16, 64], a speed option only)."""
    if k.shape[-1] > 256:
        raise ValueError(f"the triton backend supports key dims up to 256, got K={k.shape[-1]}")
    return run_chunked(
        _gated_deltanet_one, (q, k, v, g, beta), scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        chunk_range=(16, 64),
    )  # fmt: skip


__all__ = ["gated_deltanet_triton"]
