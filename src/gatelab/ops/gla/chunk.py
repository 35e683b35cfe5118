"""Gated linear attention in chunkwise-parallel form with secondary sub-chunks, in PyTorch with autograd
(Gated Linear Attention Transformers with Hardware-Efficient Training (Yang et al., 2023), sec. 4.2-4.3).

Inside a chunk of C tokens the output is A v with A the causal C x C gated score matrix; across chunks a
(K, V) state is carried. Key-wise decays make A a sum over K of exp(b_ik - b_jk) terms, which cannot be
split into exp(b_i) * exp(-b_j) without overflow under strong decay. As the paper does, the chunk is cut
into sub-chunks of c tokens: between sub-chunks every factor is decayed relative to a sub-chunk boundary
(each factor <= 1); inside a sub-chunk the c x c x K pairwise decays are formed and masked before exp.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gatelab.ops.common.chunk import decayed_chunk_attention, pairwise_decay


def sub_chunk_size(chunk_size: int) -> int:
    """About sqrt(C), a divisor of C: balances the n x n x c x K (between) and n x c x c x K (inside) work."""
    target = max(1, round(math.sqrt(chunk_size)))
    return max(d for d in range(1, target + 1) if chunk_size % d == 0)


def intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, b: torch.Tensor, sub: int) -> torch.Tensor:
    """Causal gated scores within each chunk: q, k (..., C, K) (q already scaled), b (..., C, K) the
    within-chunk cumulative log decay. Returns A (..., C, C), A[i, j] = sum_k q_ik k_jk exp(b_ik - b_jk).

    Differentiable through a hand-written backward (:class:`_IntraChunkScores`) that recomputes the decay
    factors instead of keeping autograd's (..., n, c, c, K) temporaries."""
    return _IntraChunkScores.apply(q, k, b, sub)


def _sub_chunk_factors(q, k, b, sub):
    """The pieces both passes share: q, k, b as (..., n, c, K) sub-chunks, q_in = q exp(b - b_start),
    k_out = k exp(b_end - b), between (..., n, n, K) = exp(b_start_I - b_end_J) for I > J else 0, and the
    keys seen from each query sub-chunk, (..., n, C, K): k_j exp(b_start_I - b_j), zero for j in I or later."""
    *lead, C, K = q.shape
    n, c = C // sub, sub
    qs, ks, bs = (x.reshape(*lead, n, c, K) for x in (q, k, b))  # (..., n, c, K)
    b_end = bs[..., -1, :]  # (..., n, K): log decay at the end of each sub-chunk
    b_start = F.pad(b_end[..., :-1, :], (0, 0, 1, 0))  # (..., n, K): at the end of the previous one (0 first)
    # Between sub-chunks I > J, split exp(b_i - b_j) at the boundaries: each factor is <= 1.
    in_decay = torch.exp(bs - b_start[..., None, :])  # (..., n, c, K)
    out_decay = torch.exp(b_end[..., None, :] - bs)  # (..., n, c, K)
    lower = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)[:, :, None]  # I > J
    between = (b_start[..., :, None, :] - b_end[..., None, :, :]).masked_fill(~lower, float("-inf")).exp()
    k_out = ks * out_decay
    keys = (between[..., :, :, None, :] * k_out[..., None, :, :, :]).reshape(*lead, n, C, K)
    return qs, ks, bs, qs * in_decay, in_decay, out_decay, between, keys


class _IntraChunkScores(torch.autograd.Function):
    """A (..., C, C) from q, k, b (..., C, K). Backward, with E_ijk = exp(b_ik - b_jk) (j <= i):
    dq_ik = sum_j dA_ij k_jk E_ijk, dk_jk = sum_i dA_ij q_ik E_ijk, db = q dq - k dk (A depends on b only
    through b_i - b_j), each computed with the same sub-chunk split as the forward."""

    @staticmethod
    def forward(ctx, q, k, b, sub):
        *lead, C, K = q.shape
        n, c = C // sub, sub
        qs, ks, bs, q_in, _, _, _, keys = _sub_chunk_factors(q, k, b, sub)
        A = (q_in @ keys.transpose(-1, -2)).view(*lead, n, c, n, c)  # (..., n, c, n, c): one matmul per I
        # Inside a sub-chunk: pairwise decays, masked before exp.
        A_diag = (qs[..., :, None, :] * ks[..., None, :, :] * pairwise_decay(bs)).sum(-1)  # (..., n, c, c)
        torch.diagonal(A, dim1=-4, dim2=-2).copy_(A_diag.movedim(-3, -1))  # the diagonal blocks
        ctx.save_for_backward(q, k, b)
        ctx.sub = sub
        return A.reshape(*lead, C, C)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dA):
        q, k, b = ctx.saved_tensors
        *lead, C, K = q.shape
        n, c = C // ctx.sub, ctx.sub
        qs, ks, bs, q_in, in_decay, out_decay, between, keys = _sub_chunk_factors(q, k, b, ctx.sub)
        dA = dA.contiguous()
        rows = dA.view(*lead, n, c, C)  # query rows grouped by sub-chunk I
        # Between sub-chunks (the keys vanish for J >= I, so dA's other entries do not contribute).
        dq = (rows @ keys) * in_decay  # (..., n, c, K)
        d_keys = (rows.transpose(-1, -2) @ q_in).view(*lead, n, n, c, K)  # [I, J, j, k]
        dk = (between[..., :, :, None, :] * d_keys).sum(-4) * out_decay  # summed over I: (..., n, c, K)
        # Inside a sub-chunk.
        d_diag = torch.diagonal(dA.view(*lead, n, c, n, c), dim1=-4, dim2=-2).movedim(
            -1, -3
        )  # (..., n, c, c)
        W = d_diag[..., None] * pairwise_decay(bs)  # (..., n, c, c, K), zero above the diagonal
        dq = dq + (W * ks[..., None, :, :]).sum(-2)
        dk = dk + (W * qs[..., :, None, :]).sum(-3)
        db = qs * dq - ks * dk
        shape = (*lead, C, K)
        return dq.reshape(shape), dk.reshape(shape), db.reshape(shape), None


def gla_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunked gated linear attention; same function as :func:`gla_reference`, computed in fp32;
    arguments and shapes as :func:`gatelab.ops.gla`."""
    B, _, H, K = q.shape
    o, final = decayed_chunk_attention(
        q, k, v, g, _scores, lambda C: B * H * C * (C // sub_chunk_size(C)) * K,  # the (.., n, C, K) keys
        scale=scale, initial_state=initial_state, chunk_size=chunk_size,
    )  # fmt: skip
    return o, (final if output_final_state else None)


def _scores(qc: torch.Tensor, kc: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Causal gated scores of a group of chunks (B, H, n, C, K) -> (B, H, n, C, C), through sub-chunks."""
    return intra_chunk_scores(qc, kc, b, sub_chunk_size(qc.shape[-2]))
