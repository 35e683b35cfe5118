"""Fused gated softmax attention in Triton: FlashAttention-2 forward and backward with the G1 output gate
in the epilogue ("Gated Attention for Large Language Models", Qiu et al., 2025; "FlashAttention-2", Dao, 2023).

Forward: online softmax over key blocks, then o = (acc / l) * act(gate) before the one store. Saved for the
backward: the gated output o, the log-sum-exp (B, H, T) fp32, and for SiLU only the ungated output.
Why: the softmax backward needs Delta = rowsum(dO_ungated * o_ungated) = rowsum(dO * o), which the gated
output gives directly, and for sigmoid dgate = dO * o_ungated * s (1 - s) = dO * o * (1 - s) needs nothing
more. SiLU's derivative cannot be recovered from o without dividing by the logit, so there the ungated
output is stored once (one extra B*T*H*V write in the forward, one read in the backward).
Backward: a preprocess kernel (dgate, dO_ungated = dO * act(gate), Delta), then a dK/dV kernel over key
blocks and a dQ kernel over query blocks, as FlashAttention-2. GQA: the dK/dV kernel runs per query head
and the group's heads are summed afterwards.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from gatelab.ops.common.triton_utils import dot, dot_precision

LOG2E = 1.4426950408889634


@triton.jit
def _gate_act(x, GATE_FN: tl.constexpr):
    """act(x) and act'(x) in fp32: sigmoid or SiLU."""
    s = tl.sigmoid(x)
    if GATE_FN == "sigmoid":
        return s, s * (1.0 - s)
    return x * s, s * (1.0 + x * (1.0 - s))


@triton.jit
def _fwd_kernel(
    q, k, v, gate, o, o_ungated, lse,
    T, S, H, G, D, DV, GH, qk_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, HEADWISE: tl.constexpr, GATE_FN: tl.constexpr, SAVE_UNGATED: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk = i_h // G
    o_m = i_m * BM + tl.arange(0, BM)  # query rows
    o_d, o_v = tl.arange(0, BD), tl.arange(0, BV)
    m_m, m_d, m_v = o_m < T, o_d < D, o_v < DV
    Hk = H // G
    p_q = q + ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    b_m = tl.full([BM], float("-inf"), tl.float32)
    b_l = tl.zeros([BM], tl.float32)
    b_acc = tl.zeros([BM, BV], tl.float32)
    # causal keys are bottom-right aligned: query row i sees keys j <= i + S - T
    end = tl.minimum(S, (i_m + 1) * BM + S - T) if CAUSAL else S
    for start in range(0, end, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < S
        p_k = k + ((i_b * S + o_n[:, None]) * Hk + i_hk) * D + o_d[None, :]
        p_v = v + ((i_b * S + o_n[:, None]) * Hk + i_hk) * DV + o_v[None, :]
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)  # [BN, BD]
        b_v = tl.load(p_v, mask=m_n[:, None] & m_v[None, :], other=0.0)  # [BN, BV]
        b_s = dot(b_q, tl.trans(b_k), PRECISION) * qk_scale  # [BM, BN], base-2 logits
        m_s = m_n[None, :]
        if CAUSAL:
            m_s = m_s & (o_n[None, :] <= o_m[:, None] + S - T)
        b_s = tl.where(m_s, b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_alpha = tl.exp2(b_m - b_m_new)
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + dot(b_p.to(b_v.dtype), b_v, PRECISION)
        b_m = b_m_new
    b_o = b_acc / b_l[:, None]  # [BM, BV] ungated
    m_o = m_m[:, None] & m_v[None, :]
    if HEADWISE:
        b_g = tl.load(gate + (i_b * T + o_m) * GH + i_h, mask=m_m, other=0.0).to(tl.float32)[:, None]
    else:
        p_g = gate + ((i_b * T + o_m[:, None]) * GH + i_h) * DV + o_v[None, :]
        b_g = tl.load(p_g, mask=m_o, other=0.0).to(tl.float32)
    b_act, _ = _gate_act(b_g, GATE_FN)
    p_o = ((i_b * T + o_m[:, None]) * H + i_h) * DV + o_v[None, :]
    tl.store(o + p_o, (b_o * b_act).to(o.dtype.element_ty), mask=m_o)
    if SAVE_UNGATED:
        tl.store(o_ungated + p_o, b_o.to(o_ungated.dtype.element_ty), mask=m_o)
    tl.store(lse + i_bh * T + o_m, b_m + tl.log2(b_l), mask=m_m)


@triton.jit
def _bwd_preprocess_kernel(
    do, o, o_ungated, gate, do_ungated, dgate, delta,
    T, H, DV, GH,
    BM: tl.constexpr, BV: tl.constexpr, HEADWISE: tl.constexpr, GATE_FN: tl.constexpr,
    HAS_UNGATED: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_m, o_v = i_m * BM + tl.arange(0, BM), tl.arange(0, BV)
    m_m = o_m < T
    m_o = m_m[:, None] & (o_v < DV)[None, :]
    p_o = ((i_b * T + o_m[:, None]) * H + i_h) * DV + o_v[None, :]
    b_do = tl.load(do + p_o, mask=m_o, other=0.0).to(tl.float32)  # [BM, BV]
    b_o = tl.load(o + p_o, mask=m_o, other=0.0).to(tl.float32)
    if HEADWISE:
        b_g = tl.load(gate + (i_b * T + o_m) * GH + i_h, mask=m_m, other=0.0).to(tl.float32)[:, None]
    else:
        p_g = ((i_b * T + o_m[:, None]) * GH + i_h) * DV + o_v[None, :]
        b_g = tl.load(gate + p_g, mask=m_o, other=0.0).to(tl.float32)
    b_act, b_dact = _gate_act(b_g, GATE_FN)
    if HAS_UNGATED:
        b_dg = b_do * tl.load(o_ungated + p_o, mask=m_o, other=0.0).to(tl.float32) * b_dact
    else:  # sigmoid: o_ungated * s (1 - s) = o * (1 - s)
        b_dg = b_do * b_o * (1.0 - b_act)
    if HEADWISE:
        tl.store(dgate + (i_b * T + o_m) * GH + i_h, tl.sum(b_dg, 1).to(dgate.dtype.element_ty), mask=m_m)
    else:
        tl.store(dgate + p_g, b_dg.to(dgate.dtype.element_ty), mask=m_o)
    tl.store(do_ungated + p_o, (b_do * b_act).to(do_ungated.dtype.element_ty), mask=m_o)
    tl.store(delta + i_bh * T + o_m, tl.sum(b_do * b_o, 1), mask=m_m)  # rowsum(dO o) = rowsum(dO_u o_u)


@triton.jit
def _bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dk, dv,
    T, S, H, G, D, DV, qk_scale, sm_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk, Hk = i_h // G, H // G
    o_n, o_d, o_v = i_n * BN + tl.arange(0, BN), tl.arange(0, BD), tl.arange(0, BV)
    m_n, m_d, m_v = o_n < S, o_d < D, o_v < DV
    b_k = tl.load(
        k + ((i_b * S + o_n[:, None]) * Hk + i_hk) * D + o_d[None, :],
        mask=m_n[:, None] & m_d[None, :],
        other=0.0,
    )
    b_v = tl.load(
        v + ((i_b * S + o_n[:, None]) * Hk + i_hk) * DV + o_v[None, :],
        mask=m_n[:, None] & m_v[None, :],
        other=0.0,
    )
    b_dk = tl.zeros([BN, BD], tl.float32)
    b_dv = tl.zeros([BN, BV], tl.float32)
    # the first query row that sees key i_n * BN: row + S - T >= key
    begin = tl.maximum(i_n * BN - (S - T), 0) // BM * BM if CAUSAL else 0
    for start in range(begin, T, BM):
        o_m = start + tl.arange(0, BM)
        m_m = o_m < T
        b_q = tl.load(
            q + ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :],
            mask=m_m[:, None] & m_d[None, :],
            other=0.0,
        )
        p_do = do + ((i_b * T + o_m[:, None]) * H + i_h) * DV + o_v[None, :]
        b_do = tl.load(p_do, mask=m_m[:, None] & m_v[None, :], other=0.0)  # [BM, BV]
        b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=0.0)
        b_delta = tl.load(delta + i_bh * T + o_m, mask=m_m, other=0.0)
        b_st = dot(b_k, tl.trans(b_q), PRECISION) * qk_scale  # [BN, BM] transposed scores
        m_s = m_n[:, None] & m_m[None, :]
        if CAUSAL:
            m_s = m_s & (o_n[:, None] <= o_m[None, :] + S - T)
        b_pt = tl.where(m_s, tl.exp2(b_st - b_lse[None, :]), 0.0)  # [BN, BM]
        b_dv += dot(b_pt.to(b_do.dtype), b_do, PRECISION)
        b_dpt = dot(b_v, tl.trans(b_do), PRECISION)  # [BN, BM]
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += dot(b_dst.to(b_q.dtype), b_q, PRECISION)
    p_dk = dk + ((i_b * S + o_n[:, None]) * H + i_h) * D + o_d[None, :]
    p_dv = dv + ((i_b * S + o_n[:, None]) * H + i_h) * DV + o_v[None, :]
    tl.store(p_dk, (b_dk * sm_scale).to(dk.dtype.element_ty), mask=m_n[:, None] & m_d[None, :])
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), mask=m_n[:, None] & m_v[None, :])


@triton.jit
def _bwd_dq_kernel(
    q, k, v, do, lse, delta, dq,
    T, S, H, G, D, DV, qk_scale, sm_scale,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    i_m, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_hk, Hk = i_h // G, H // G
    o_m, o_d, o_v = i_m * BM + tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BV)
    m_m, m_d, m_v = o_m < T, o_d < D, o_v < DV
    b_q = tl.load(
        q + ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :],
        mask=m_m[:, None] & m_d[None, :],
        other=0.0,
    )
    b_do = tl.load(
        do + ((i_b * T + o_m[:, None]) * H + i_h) * DV + o_v[None, :],
        mask=m_m[:, None] & m_v[None, :],
        other=0.0,
    )
    b_lse = tl.load(lse + i_bh * T + o_m, mask=m_m, other=0.0)
    b_delta = tl.load(delta + i_bh * T + o_m, mask=m_m, other=0.0)
    b_dq = tl.zeros([BM, BD], tl.float32)
    end = tl.minimum(S, (i_m + 1) * BM + S - T) if CAUSAL else S
    for start in range(0, end, BN):
        o_n = start + tl.arange(0, BN)
        m_n = o_n < S
        b_k = tl.load(
            k + ((i_b * S + o_n[:, None]) * Hk + i_hk) * D + o_d[None, :],
            mask=m_n[:, None] & m_d[None, :],
            other=0.0,
        )
        p_v = v + ((i_b * S + o_n[:, None]) * Hk + i_hk) * DV + o_v[None, :]
        b_v = tl.load(p_v, mask=m_n[:, None] & m_v[None, :], other=0.0)
        b_s = dot(b_q, tl.trans(b_k), PRECISION) * qk_scale  # [BM, BN]
        m_s = m_m[:, None] & m_n[None, :]
        if CAUSAL:
            m_s = m_s & (o_n[None, :] <= o_m[:, None] + S - T)
        b_p = tl.where(m_s, tl.exp2(b_s - b_lse[:, None]), 0.0)
        b_dp = dot(b_do, tl.trans(b_v), PRECISION)  # [BM, BN]
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dq += dot(b_ds.to(b_k.dtype), b_k, PRECISION)
    tl.store(dq + ((i_b * T + o_m[:, None]) * H + i_h) * D + o_d[None, :], (b_dq * sm_scale).to(dq.dtype.element_ty),
             mask=m_m[:, None] & m_d[None, :])  # fmt: skip


def _configs(x: torch.Tensor, D: int, DV: int) -> tuple[int, int, dict]:
    """(BD, BV, launch options per kernel). The GPU blocks start from the Triton FlashAttention tutorial's
    shapes, chosen among a few by fewest register spills when compiled for sm_90
    (benchmarks/gpu_compile_check.py); not yet timed. The interpreter takes 16 x 16 blocks."""
    BD, BV = triton.next_power_of_2(max(D, 16)), triton.next_power_of_2(max(DV, 16))
    if not x.is_cuda:
        tiny = dict(BM=16, BN=16)
        return BD, BV, {"fwd": tiny, "prep": dict(BM=16), "dkdv": tiny, "dq": tiny}
    if max(BD, BV) > 128:  # fewer rows per block keeps the tiles in registers
        return (
            BD,
            BV,
            {
                "fwd": dict(BM=64, BN=32, num_warps=4, num_stages=2),
                "prep": dict(BM=16, num_warps=4),
                "dkdv": dict(BM=16, BN=64, num_warps=4, num_stages=2),
                "dq": dict(BM=64, BN=16, num_warps=4, num_stages=2),
            },
        )
    return (
        BD,
        BV,
        {
            "fwd": dict(BM=128, BN=64, num_warps=8, num_stages=3),
            "prep": dict(BM=32, num_warps=4),  # elementwise: 32 rows keep the [rows, V] tiles in registers
            "dkdv": dict(BM=64, BN=64, num_warps=8, num_stages=3),
            "dq": dict(BM=128, BN=32, num_warps=8, num_stages=3),
        },
    )


class _GatedSoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, gate, causal, scale, gate_fn):
        B, T, H, D = q.shape
        S, Hk, DV = k.shape[1], k.shape[2], v.shape[3]
        q, k, v, gate = (x.contiguous() for x in (q, k, v, gate))
        headwise = gate.shape[3] == 1
        BD, BV, configs = _configs(q, D, DV)
        BM = configs["fwd"]["BM"]
        o = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device)
        save_ungated = gate_fn == "silu"
        o_ungated = torch.empty(B, T, H, DV, dtype=q.dtype, device=q.device) if save_ungated else o
        lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        grid = (triton.cdiv(T, BM), B * H)
        _fwd_kernel[grid](
            q, k, v, gate, o, o_ungated, lse, T, S, H, H // Hk, D, DV, H, scale * LOG2E,
            BD=BD, BV=BV, CAUSAL=causal, HEADWISE=headwise, GATE_FN=gate_fn,
            SAVE_UNGATED=save_ungated, PRECISION=dot_precision(q), **configs["fwd"],
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, gate, o, o_ungated if save_ungated else None, lse)
        ctx.options = (causal, scale, gate_fn, BD, BV, configs)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, gate, o, o_ungated, lse = ctx.saved_tensors
        causal, scale, gate_fn, BD, BV, configs = ctx.options
        BM = configs["prep"]["BM"]
        B, T, H, D = q.shape
        S, Hk, DV = k.shape[1], k.shape[2], v.shape[3]
        G = H // Hk
        do = do.contiguous()
        headwise = gate.shape[3] == 1
        do_ungated = torch.empty(do.shape, dtype=do.dtype, device=do.device)
        dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        delta = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
        _bwd_preprocess_kernel[(triton.cdiv(T, BM), B * H)](
            do, o, o_ungated if o_ungated is not None else o, gate, do_ungated, dgate, delta, T, H, DV, H,
            BV=BV, HEADWISE=headwise, GATE_FN=gate_fn, HAS_UNGATED=o_ungated is not None, **configs["prep"],
        )  # fmt: skip
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(B, S, H, D, dtype=q.dtype if G == 1 else torch.float32, device=q.device)
        dv = torch.empty(B, S, H, DV, dtype=q.dtype if G == 1 else torch.float32, device=q.device)
        common = dict(BD=BD, BV=BV, CAUSAL=causal, PRECISION=dot_precision(q))
        args = (T, S, H, G, D, DV, scale * LOG2E, scale)
        grid = (triton.cdiv(S, configs["dkdv"]["BN"]), B * H)
        _bwd_dkdv_kernel[grid](q, k, v, do_ungated, lse, delta, dk, dv, *args, **common, **configs["dkdv"])
        grid = (triton.cdiv(T, configs["dq"]["BM"]), B * H)
        _bwd_dq_kernel[grid](q, k, v, do_ungated, lse, delta, dq, *args, **common, **configs["dq"])
        if G > 1:  # GQA: each key/value head collects the gradients of its group of query heads
            dk = dk.view(B, S, Hk, G, D).sum(3).to(k.dtype)
            dv = dv.view(B, S, Hk, G, DV).sum(3).to(v.dtype)
        return dq, dk, dv, dgate, None, None, None


def gated_softmax_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gate: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    gate_fn: str = "sigmoid",
) -> torch.Tensor:
    """o = softmax attention(q, k, v) * act(gate), one fused kernel forward and backward.

    Args:
        q: (B, T, H, D) queries.
        k: (B, S, Hkv, D) keys, H a multiple of Hkv (GQA); S >= T when causal.
        v: (B, S, Hkv, V) values.
        gate: (B, T, H, V) gate logits (elementwise) or (B, T, H, 1) (headwise).
        causal: causal mask, bottom-right aligned when T < S.
        scale: score scale, default D ** -0.5.
        gate_fn: "sigmoid" or "silu".
    Returns:
        o: (B, T, H, V) in q's dtype. Differentiable in q, k, v and gate.
    """
    if gate_fn not in ("sigmoid", "silu"):
        raise ValueError(f"gate_fn must be 'sigmoid' or 'silu' for the triton backend, got {gate_fn!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return _GatedSoftmaxFunction.apply(q, k, v, gate, causal, scale, gate_fn)


__all__ = ["gated_softmax_triton"]
