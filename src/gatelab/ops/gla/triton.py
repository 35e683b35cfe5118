"""Chunked gated linear attention in Triton, forward and backward ("Gated Linear Attention Transformers with
Hardware-Efficient Training", Yang et al., 2023).

S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,  o_t = scale * q_t S_t,  g (B, T, H, K) log decay.

Three passes, as the paper's chunkwise form: (1) a sequential pass over chunks writes the state at the
start of every chunk, (2) a pass parallel over sub-chunks of 16 rows computes the output from that state
and from the intra-chunk terms, (3) the backward mirrors both (a reverse pass for the state gradients, then
dq, dk, dv per sub-chunk) and dg comes from the identity dG_t = q_t dq_t - k_t dk_t (G the cumulative log
decay) followed by a reverse cumulative sum.

Numerics: every exponential is of a difference g_i - g_j with i after j, so it never exceeds 1: across
sub-chunks the difference is split at the last row before the later sub-chunk (both halves <= 0) and fed to
a matmul; inside a 16-row sub-chunk it is formed row by row. No inf/NaN with strong decay.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from gatelab.ops.common.chunk import LOG_DECAY_FLOOR
from gatelab.ops.common.triton_utils import dot_f32, dot_precision, run_chunked

SUB = 16  # rows per sub-chunk: the smallest tl.dot


@triton.jit
def _fwd_h_kernel(
    k, v, gc, h0, h, ht, T, H, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_H0: tl.constexpr, STORE_HT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """h[:, :, c] = state before chunk c (B, H, NT, K, V); the decay is diagonal, so K and V split freely."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_h = tl.zeros([BK, BV], tl.float32)
    if HAS_H0:
        b_h += tl.load(h0 + i_bh * K * V + p_kv, mask=m_kv, other=0.0)
    for i_t in range(NT):
        tl.store(h + (i_bh * NT + i_t) * K * V + p_kv, b_h.to(h.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        last = tl.minimum(i_t * BT + BT, T) - 1
        p_tk = ((i_b * T + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_k = tl.load(k + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_g = tl.load(gc + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_v = tl.load(
            v + ((i_b * T + o_t[:, None]) * H + i_h) * V + o_v[None, :],
            mask=m_t[:, None] & m_v[None, :],
            other=0.0,
        )
        b_glast = tl.load(gc + ((i_b * T + last) * H + i_h) * K + o_k, mask=m_k, other=0.0)  # [BK]
        b_kd = tl.where(m_t[:, None], b_k * tl.exp(b_glast[None, :] - b_g), 0.0).to(tl.float32)
        b_h = b_h * tl.exp(b_glast)[:, None] + dot_f32(tl.trans(b_kd), b_v, PRECISION)
    if STORE_HT:
        tl.store(ht + i_bh * K * V + p_kv, b_h, mask=m_kv)


@triton.jit
def _bwd_dh_kernel(
    q, do, gc, dht, dh, dh0, scale, T, H, K, V, NT,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DHT: tl.constexpr, STORE_DH0: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dh[:, :, c] = gradient of the state after chunk c; runs from the last chunk to the first."""
    i_k, i_v, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    o_k, o_v = i_k * BK + tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    p_kv = o_k[:, None] * V + o_v[None, :]
    b_dh = tl.zeros([BK, BV], tl.float32)
    if HAS_DHT:
        b_dh += tl.load(dht + i_bh * K * V + p_kv, mask=m_kv, other=0.0)
    for i_r in range(NT):
        i_t = NT - 1 - i_r
        tl.store(dh + (i_bh * NT + i_t) * K * V + p_kv, b_dh.to(dh.dtype.element_ty), mask=m_kv)
        o_t = i_t * BT + tl.arange(0, BT)
        m_t = o_t < T
        last = tl.minimum(i_t * BT + BT, T) - 1
        p_tk = ((i_b * T + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        b_q = tl.load(q + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
        b_g = tl.load(gc + p_tk, mask=m_t[:, None] & m_k[None, :], other=0.0)
        b_do = tl.load(
            do + ((i_b * T + o_t[:, None]) * H + i_h) * V + o_v[None, :],
            mask=m_t[:, None] & m_v[None, :],
            other=0.0,
        )
        b_glast = tl.load(gc + ((i_b * T + last) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_qd = (b_q * tl.exp(b_g) * scale).to(tl.float32)
        b_dh = b_dh * tl.exp(b_glast)[:, None] + dot_f32(tl.trans(b_qd), b_do, PRECISION)
    if STORE_DH0:
        tl.store(dh0 + i_bh * K * V + p_kv, b_dh, mask=m_kv)


@triton.jit
def _fwd_o_kernel(
    q, k, v, gc, h, o, scale, T, H, K, V, NT,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per 16-row sub-chunk and V block: inter-chunk term from h, intra-chunk terms."""
    i_v, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    NC = BT // BC
    i_t, i_c = i_s // NC, i_s % NC
    start = i_t * BT + i_c * BC
    if start >= T:
        return
    o_k, o_v = tl.arange(0, BK), i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    o_i = start + tl.arange(0, BC)
    m_i = o_i < T
    p_ik = ((i_b * T + o_i[:, None]) * H + i_h) * K + o_k[None, :]
    b_q = tl.load(q + p_ik, mask=m_i[:, None] & m_k[None, :], other=0.0)  # [BC, BK]
    b_g = tl.load(gc + p_ik, mask=m_i[:, None] & m_k[None, :], other=0.0)
    b_h = tl.load(
        h + (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :],
        mask=m_k[:, None] & m_v[None, :],
        other=0.0,
    )
    b_o = dot_f32((b_q * tl.exp(b_g)).to(tl.float32), b_h.to(tl.float32), PRECISION)  # [BC, BV]
    if i_c > 0:  # earlier sub-chunks of this chunk: split the decay at the row before this sub-chunk
        b_gr = tl.load(gc + ((i_b * T + start - 1) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_qr = tl.where(m_i[:, None], b_q * tl.exp(b_g - b_gr[None, :]), 0.0).to(tl.float32)
        for i_j in range(0, i_c):
            o_j = i_t * BT + i_j * BC + tl.arange(0, BC)
            p_jk = ((i_b * T + o_j[:, None]) * H + i_h) * K + o_k[None, :]
            b_k = tl.load(k + p_jk, mask=m_k[None, :], other=0.0)
            b_gj = tl.load(gc + p_jk, mask=m_k[None, :], other=0.0)
            b_v = tl.load(
                v + ((i_b * T + o_j[:, None]) * H + i_h) * V + o_v[None, :], mask=m_v[None, :], other=0.0
            )
            b_kr = (b_k * tl.exp(b_gr[None, :] - b_gj)).to(tl.float32)
            b_a = dot_f32(b_qr, tl.trans(b_kr), PRECISION)  # [BC, BC]
            b_o += dot_f32(b_a.to(tl.float32), b_v, PRECISION)
    o_r = tl.arange(0, BC)
    for j in range(0, BC):  # the diagonal sub-chunk, one key row at a time
        t = start + j
        m_jk, m_jv = m_k & (o_k * 0 + t < T), m_v & (o_v * 0 + t < T)
        p_jk = ((i_b * T + t) * H + i_h) * K + o_k
        b_kj = tl.load(k + p_jk, mask=m_jk, other=0.0).to(tl.float32)  # [BK]
        b_gj = tl.load(gc + p_jk, mask=m_jk, other=0.0)
        b_vj = tl.load(v + ((i_b * T + t) * H + i_h) * V + o_v, mask=m_jv, other=0.0).to(tl.float32)
        m_a = (o_r >= j) & m_i
        b_e = tl.exp(tl.where(m_a[:, None], b_g - b_gj[None, :], float("-inf")))  # [BC, BK]
        b_a = tl.sum(b_q.to(tl.float32) * b_kj[None, :] * b_e, 1)  # [BC]
        b_o += b_a[:, None] * b_vj[None, :]
    p_o = o + ((i_b * T + o_i[:, None]) * H + i_h) * V + o_v[None, :]
    tl.store(p_o, (b_o * scale).to(o.dtype.element_ty), mask=m_i[:, None] & m_v[None, :])


@triton.jit
def _bwd_dqkv_kernel(
    q, k, v, gc, h, do, dh, dq, dk, dv, scale, T, H, K, V, NT,
    BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dq, dk, dv of one 16-row sub-chunk (full K and V per program)."""
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    NC = BT // BC
    i_t, i_c = i_s // NC, i_s % NC
    start = i_t * BT + i_c * BC
    if start >= T:
        return
    o_k, o_v, o_r = tl.arange(0, BK), tl.arange(0, BV), tl.arange(0, BC)
    m_k, m_v = o_k < K, o_v < V
    o_i = start + o_r
    m_i = o_i < T
    m_ik, m_iv = m_i[:, None] & m_k[None, :], m_i[:, None] & m_v[None, :]
    p_ik = ((i_b * T + o_i[:, None]) * H + i_h) * K + o_k[None, :]
    p_iv = ((i_b * T + o_i[:, None]) * H + i_h) * V + o_v[None, :]
    b_k = tl.load(k + p_ik, mask=m_ik, other=0.0)
    b_g = tl.load(gc + p_ik, mask=m_ik, other=0.0)
    b_v = tl.load(v + p_iv, mask=m_iv, other=0.0)  # [BC, BV]
    b_do = tl.load(do + p_iv, mask=m_iv, other=0.0)
    last = tl.minimum(i_t * BT + BT, T) - 1
    b_glast = tl.load(gc + ((i_b * T + last) * H + i_h) * K + o_k, mask=m_k, other=0.0)
    p_kv = (i_bh * NT + i_t) * K * V + o_k[:, None] * V + o_v[None, :]
    b_h = tl.load(h + p_kv, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)  # [BK, BV]
    b_dh = tl.load(dh + p_kv, mask=m_k[:, None] & m_v[None, :], other=0.0).to(tl.float32)
    # inter-chunk terms: o = scale (q e^g) h  and  S_next = e^(g_last) h + (k e^(g_last - g))^T v
    b_dq = dot_f32(b_do, tl.trans(b_h), PRECISION) * tl.exp(b_g)  # [BC, BK], scale applied at the end
    b_kd = tl.where(m_ik, tl.exp(b_glast[None, :] - b_g), 0.0)  # [BC, BK]
    b_dk_inter = dot_f32(b_v, tl.trans(b_dh), PRECISION) * b_kd  # no scale on the state path
    b_dv_inter = dot_f32((b_k * b_kd).to(tl.float32), b_dh, PRECISION)  # [BC, BV]
    b_dk = tl.zeros([BC, BK], tl.float32)
    b_dv = tl.zeros([BC, BV], tl.float32)
    # intra-chunk, earlier sub-chunks j < i_c contribute to dq
    if i_c > 0:
        b_gr = tl.load(gc + ((i_b * T + start - 1) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_acc = tl.zeros([BC, BK], tl.float32)
        for i_j in range(0, i_c):
            o_j = i_t * BT + i_j * BC + o_r
            p_jk = ((i_b * T + o_j[:, None]) * H + i_h) * K + o_k[None, :]
            b_kj = tl.load(k + p_jk, mask=m_k[None, :], other=0.0)
            b_gj = tl.load(gc + p_jk, mask=m_k[None, :], other=0.0)
            b_vj = tl.load(
                v + ((i_b * T + o_j[:, None]) * H + i_h) * V + o_v[None, :], mask=m_v[None, :], other=0.0
            )
            b_da = dot_f32(b_do, tl.trans(b_vj), PRECISION)  # [BC, BC]
            b_acc += dot_f32(
                b_da.to(tl.float32), (b_kj * tl.exp(b_gr[None, :] - b_gj)).to(tl.float32), PRECISION
            )
        b_dq += tl.where(m_ik, b_acc * tl.exp(b_g - b_gr[None, :]), 0.0)
    # later sub-chunks of this chunk (within T) contribute to dk and dv; split at this sub-chunk's last row
    n_later = (tl.minimum(i_t * BT + BT, T) - start - 1) // BC  # sub-chunks after this one, within T
    if n_later > 0:
        b_gr = tl.load(gc + ((i_b * T + start + BC - 1) * H + i_h) * K + o_k, mask=m_k, other=0.0)
        b_kr = (b_k * tl.exp(b_gr[None, :] - b_g)).to(tl.float32)  # every row valid: the sub-chunk is full
        b_acc = tl.zeros([BC, BK], tl.float32)
        for i_j in range(i_c + 1, i_c + 1 + n_later):
            o_j = i_t * BT + i_j * BC + o_r
            m_j = o_j < T
            p_jk = ((i_b * T + o_j[:, None]) * H + i_h) * K + o_k[None, :]
            b_qj = tl.load(q + p_jk, mask=m_j[:, None] & m_k[None, :], other=0.0)
            b_gj = tl.load(gc + p_jk, mask=m_j[:, None] & m_k[None, :], other=0.0)
            p_jv = ((i_b * T + o_j[:, None]) * H + i_h) * V + o_v[None, :]
            b_doj = tl.load(do + p_jv, mask=m_j[:, None] & m_v[None, :], other=0.0)
            b_qr = tl.where(m_j[:, None], b_qj * tl.exp(b_gj - b_gr[None, :]), 0.0).to(tl.float32)
            b_at = dot_f32(b_kr, tl.trans(b_qr), PRECISION)  # [BC, BC] = A^T / scale
            b_dv += dot_f32(b_at.to(tl.float32), b_doj, PRECISION)
            b_dat = dot_f32(b_v, tl.trans(b_doj), PRECISION)  # [BC, BC] = dA^T / scale
            b_acc += dot_f32(b_dat.to(tl.float32), b_qr, PRECISION)
        b_dk += b_acc * tl.exp(b_gr[None, :] - b_g)
    # the diagonal sub-chunk, one row at a time: row j as a key for dq, as a query for dk and dv
    b_kf, b_vf, b_dof = b_k.to(tl.float32), b_v.to(tl.float32), b_do.to(tl.float32)
    for j in range(0, BC):
        t = start + j
        m_j = o_r * 0 + t < T  # [BC], all equal
        m_jk, m_jv = m_k & (o_k * 0 + t < T), m_v & (o_v * 0 + t < T)
        p_jk = ((i_b * T + t) * H + i_h) * K + o_k
        p_jv = ((i_b * T + t) * H + i_h) * V + o_v
        b_qj = tl.load(q + p_jk, mask=m_jk, other=0.0).to(tl.float32)  # [BK]
        b_kj = tl.load(k + p_jk, mask=m_jk, other=0.0).to(tl.float32)
        b_gj = tl.load(gc + p_jk, mask=m_jk, other=0.0)
        b_vj = tl.load(v + p_jv, mask=m_jv, other=0.0).to(tl.float32)  # [BV]
        b_doj = tl.load(do + p_jv, mask=m_jv, other=0.0).to(tl.float32)
        # key j, queries i >= j of this sub-chunk
        m_q = (o_r >= j) & m_i
        b_e = tl.exp(tl.where(m_q[:, None], b_g - b_gj[None, :], float("-inf")))  # [BC, BK]
        b_dq += tl.sum(b_dof * b_vj[None, :], 1)[:, None] * b_kj[None, :] * b_e
        # query j, keys i <= j of this sub-chunk
        m_kk = (o_r <= j) & m_j
        b_e = tl.exp(tl.where(m_kk[:, None], b_gj[None, :] - b_g, float("-inf")))  # [BC, BK]
        b_dk += tl.sum(b_vf * b_doj[None, :], 1)[:, None] * b_qj[None, :] * b_e
        b_dv += tl.sum(b_kf * b_qj[None, :] * b_e, 1)[:, None] * b_doj[None, :]
    tl.store(dq + p_ik, (b_dq * scale).to(dq.dtype.element_ty), mask=m_ik)
    tl.store(dk + p_ik, (b_dk * scale + b_dk_inter).to(dk.dtype.element_ty), mask=m_ik)
    tl.store(dv + p_iv, (b_dv * scale + b_dv_inter).to(dv.dtype.element_ty), mask=m_iv)


def _chunk_cumsum(g: torch.Tensor, BT: int) -> torch.Tensor:
    """Cumulative log decay inside each chunk of BT steps, fp32: (B, T, H, K) -> (B, T, H, K)."""
    B, T, H, K = g.shape
    NT = triton.cdiv(T, BT)
    padded = F.pad(g.float(), (0, 0, 0, 0, 0, NT * BT - T))  # (B, NT * BT, H, K)
    return padded.view(B, NT, BT, H, K).cumsum(2).view(B, NT * BT, H, K)[:, :T].contiguous()


def _launch(x: torch.Tensor) -> dict:
    """Launch options on CUDA: 8 warps spill far fewer registers than 4 for these tiles when compiled for
    sm_90 (benchmarks/gpu_compile_check.py); not yet timed."""
    return dict(num_warps=8, num_stages=2) if x.is_cuda else {}


def _blocks(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    K, V = q.shape[-1], v.shape[-1]
    return triton.next_power_of_2(max(K, 16)), triton.next_power_of_2(max(V, 16))


class _GLAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, scale, initial_state, chunk_size):
        ctx.set_materialize_grads(False)
        q, k, v = (x.contiguous() for x in (q, k, v))
        B, T, H, K = q.shape
        V = v.shape[-1]
        BT, BC = chunk_size, SUB
        NT = triton.cdiv(T, BT)
        BK, BV = _blocks(q, v)
        BKs, BVs = min(BK, 64), min(BV, 64)
        precision = dot_precision(q)
        gc = _chunk_cumsum(g, BT)  # (B, T, H, K) fp32
        h0 = initial_state.float().contiguous() if initial_state is not None else None
        h = torch.empty(B, H, NT, K, V, dtype=torch.float32, device=q.device)  # state before each chunk
        ht = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device)
        _fwd_h_kernel[(triton.cdiv(K, BKs), triton.cdiv(V, BVs), B * H)](
            k, v, gc, h0 if h0 is not None else ht, h, ht, T, H, K, V, NT,
            BT=BT, BK=BKs, BV=BVs, HAS_H0=h0 is not None, STORE_HT=True, PRECISION=precision, **_launch(q),
        )  # fmt: skip
        o = torch.empty(B, T, H, V, dtype=q.dtype, device=q.device)
        _fwd_o_kernel[(triton.cdiv(V, BVs), NT * (BT // BC), B * H)](
            q,
            k,
            v,
            gc,
            h,
            o,
            scale,
            T,
            H,
            K,
            V,
            NT,
            BT=BT,
            BC=BC,
            BK=BK,
            BV=BVs,
            PRECISION=precision,
            **_launch(q),
        )
        ctx.save_for_backward(q, k, v, gc, h, ht)
        ctx.options = (scale, BT, h0 is not None, g.dtype)
        return o, ht

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, gc, h, ht = ctx.saved_tensors
        scale, BT, has_h0, g_dtype = ctx.options
        B, T, H, K = q.shape
        V = v.shape[-1]
        NT = triton.cdiv(T, BT)
        BK, BV = _blocks(q, v)
        BKs, BVs = min(BK, 64), min(BV, 64)
        precision = dot_precision(q)
        do = torch.zeros_like(v) if do is None else do.contiguous()
        dh = torch.empty(
            B, H, NT, K, V, dtype=torch.float32, device=q.device
        )  # gradient of the state after chunk c
        dh0 = torch.empty(B, H, K, V, dtype=torch.float32, device=q.device) if has_h0 else None
        _bwd_dh_kernel[(triton.cdiv(K, BKs), triton.cdiv(V, BVs), B * H)](
            q, do, gc, dht.float().contiguous() if dht is not None else dh, dh, dh0 if has_h0 else dh, scale,
            T, H, K, V, NT, BT=BT, BK=BKs, BV=BVs, HAS_DHT=dht is not None, STORE_DH0=has_h0,
            PRECISION=precision, **_launch(q),
        )  # fmt: skip
        # dq and dk in fp32: dg is a difference of their products with q and k
        dq = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
        dk = torch.empty(B, T, H, K, dtype=torch.float32, device=q.device)
        dv = torch.empty(B, T, H, V, dtype=v.dtype, device=q.device)
        _bwd_dqkv_kernel[(NT * (BT // SUB), B * H)](
            q, k, v, gc, h, do, dh, dq, dk, dv, scale, T, H, K, V, NT,
            BT=BT, BC=SUB, BK=BK, BV=BV, PRECISION=precision, **_launch(q),
        )  # fmt: skip
        # G_t = cumulative log decay; dL/dG_t = q_t dq_t - k_t dk_t (+ S_T dS_T at t = T), dg = reverse cumsum
        dG = q.float() * dq - k.float() * dk  # (B, T, H, K)
        if dht is not None:
            dG[:, -1] += (ht * dht.float()).sum(-1)  # (B, H, K)
        dg = dG.flip(1).cumsum(1).flip(1)
        return dq.to(q.dtype), dk.to(k.dtype), dv, dg.to(g_dtype), None, dh0, None


def _gla_one(q, k, v, g, *, scale, initial_state, output_final_state, chunk_size):
    o, ht = _GLAFunction.apply(q, k, v, g, scale, initial_state, chunk_size)
    return o, (ht if output_final_state else None)


def gla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention, chunked Triton kernels with autograd; arguments and shapes as
    :func:`gatelab.ops.gla` (``chunk_size`` is rounded up to a power of two in [16, 128], a speed option
    only; ``initial_state`` may have any float dtype and is used in fp32)."""
    if max(q.shape[-1], v.shape[-1]) > 256:
        raise ValueError(
            f"the triton backend supports head dims up to 256, got K={q.shape[-1]}, V={v.shape[-1]}"
        )
    # a closed gate (e.g. finfo.min) at the floor: the same factor 0, a finite cumulative sum (see
    # LOG_DECAY_FLOOR); outside the autograd Function, so the clamp zeroes dg where it acts, as the reference
    g = g.clamp(min=LOG_DECAY_FLOOR)
    return run_chunked(
        _gla_one, (q, k, v, g), scale=scale, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
        chunk_range=(SUB, 128),
    )  # fmt: skip


__all__ = ["gla_triton"]
