"""What the Miras memories share (It's All Connected: A Journey Through Test-Time Memorization,
Attentional Bias, Retention, and Online Optimization, Behrouz et al., 2025): a matrix memory W (K x V per
head) learnt online by gradient steps on an attentional-bias loss with a retention gate,

    e_t = k_t W_{t-1} - v_t,   A_t = alpha_t A_{t-1} - eta_t k_t^T psi(e_t),   W_t = R(A_t),
    o_t = scale q_t W_t,

psi the gradient of the loss in the prediction (Moneta: l_p, Yaad: Huber, Memora: l_2), R the read-out of
the memory from its accumulator A (Moneta: the l_q normalisation; Memora: a softmax over each row, its KL
retention step; Yaad: none). The gradient is taken at the memory before the step, W_{t-1}, as the paper's online
gradient descent writes it (not at the decayed alpha_t W_{t-1} as Gated DeltaNet does; at p = q = 2 the two
agree after reparametrising beta = 2 eta / alpha and v -> alpha v, which the tests check).

Backends: "reference" (this recurrence token by token, fp32; also the decoding step form, so it is the
"recurrent" backend too) and "chunk", the paper's chunk-parallel training form: every gradient of a chunk
is taken at the chunk-start memory W_0, after which A_t is a linear recurrence solved in parallel. Chunks of
one token are the recurrence exactly; longer chunks differ by design.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from gatelab.ops.common.checks import (
    check_attention_values,
    check_choice,
    check_heads,
    check_log_gate,
    check_same,
    check_tensor,
)
from gatelab.ops.common.chunk import chunk_length, chunk_qkv, from_chunks, to_chunks
from gatelab.ops.common.linear import check_linear_options, run_linear
from gatelab.ops.common.mlp_memory import check_mlp_state, mlp_memory_chunk
from gatelab.ops.common.recurrent import initial_or_zeros
from gatelab.ops.gated_deltanet.chunk import segment_sums  # the chunk decays, shared with the delta rule

# psi(e, *extra) -> the loss gradient in the prediction, e (..., V) the error, extra per-token terms
# broadcast like e[..., :1]
BiasGradient = Callable[..., torch.Tensor]
# R(A) -> W on (..., K, V) accumulators, or None for W = A
Readout = Callable[[torch.Tensor], torch.Tensor]


def lq_normalize(A: torch.Tensor, power: float, floor: float) -> torch.Tensor:
    """W = A / max(||A||_q, floor)^(q - 2), the l_q norm over each head's whole (K, V) memory (dims -2, -1).

    q = 2 is the identity. ``floor`` keeps a near-zero memory from being divided by a near-zero norm (for
    q > 2 the map has degree 3 - q: it would blow a small memory up); the paper states no floor."""
    if power == 2:
        return A
    norm = A.abs().pow(power).sum(dim=(-2, -1), keepdim=True).pow(1 / power)
    return A / norm.clamp(min=floor).pow(power - 2)


def lp_gradient(error: torch.Tensor, power: float) -> torch.Tensor:
    """d ||e||_p^p / d e = p sign(e) |e|^(p-1), elementwise (p >= 2: finite derivative at e = 0)."""
    if power == 2:
        return 2 * error
    return power * error.sign() * error.abs().pow(power - 1)


def read_out(readout: Readout | None, A: torch.Tensor) -> torch.Tensor:
    """The memory W = readout(A) (B, H, ..., K, V); A itself without a read-out."""
    return A if readout is None else readout(A)


def memory_step(psi, readout, state, q, k, v, g, eta, *extra, scale):
    """One token. q, k (B, H, K); v (B, H, V); g, eta and extra (B, H); state A (B, H, K, V), all fp32.
    Returns o (B, H, V) and the new A."""
    W = read_out(readout, state)
    error = torch.einsum("bhk,bhkv->bhv", k, W) - v  # (B, H, V)
    update = eta[..., None] * psi(error, *(x[..., None] for x in extra))  # (B, H, V)
    state = state * g.exp()[..., None, None] - k[..., :, None] * update[..., None, :]
    return torch.einsum("bhk,bhkv->bhv", q * scale, read_out(readout, state)), state


def memory_reference(
    psi: BiasGradient,
    readout: Readout | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    *extra: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence token by token in fp32; arguments and shapes as :func:`memory_op`."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    state = initial_or_zeros(initial_state, q, v)  # (B, H, K, V)
    gates = [x.float() for x in (g, eta, *extra)]
    outputs = []
    for t in range(q.shape[1]):
        o, state = memory_step(psi, readout, state, q[:, t].float(), k[:, t].float(),
                               v[:, t].float(), *(x[:, t] for x in gates), scale=scale)  # fmt: skip
        outputs.append(o)
    o = torch.stack(outputs, dim=1).to(q.dtype)  # (B, T, H, V)
    return o, (state if output_final_state else None)


def memory_chunk(
    psi: BiasGradient,
    readout: Readout | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    *extra: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunk-parallel form, gradients at each chunk's start memory W_0; arguments as :func:`memory_op`.

    Within a chunk, with U_j = eta_j psi(k_j W_0 - v_j), Gamma[t, j] = prod_{j < l <= t} alpha_l and
    G_t = Gamma[t, 0]:  A_t = G_t A_0 - sum_{j <= t} Gamma[t, j] k_j^T U_j, so
    q_t A_t = G_t q_t A_0 - sum_j Gamma[t, j] (q_t . k_j) U_j. With l_q normalisation every A_t of the chunk
    is formed (B, H, C, K, V) for the read-out."""
    T = q.shape[1]
    C = chunk_length(chunk_size, T)
    # (B, H, N, C, ...) fp32; padded tokens have eta = 0 (no write) and g = 0 (no decay): the memory stays
    qc, kc, vc = chunk_qkv(q, k, v, C, scale)  # (B, H, N, C, K|V), q scaled
    gc, ec = to_chunks(g, C), to_chunks(eta, C)  # (B, H, N, C)
    xc = [to_chunks(x, C) for x in extra]
    N = qc.shape[2]
    gamma = segment_sums(gc).exp()  # (B, H, N, C, C), zero above the diagonal
    decay_from_start = gc.cumsum(dim=-1).exp()  # (B, H, N, C): G_t
    intra = qc @ kc.transpose(-1, -2) * gamma  # (B, H, N, C, C)
    A = initial_or_zeros(initial_state, q, v)  # (B, H, K, V)
    outputs = []
    for n in range(N):
        W0 = read_out(readout, A)
        error = kc[:, :, n] @ W0 - vc[:, :, n]  # (B, H, C, V): every gradient at W_0
        U = ec[:, :, n, :, None] * psi(error, *(x[:, :, n, :, None] for x in xc))  # (B, H, C, V)
        G = decay_from_start[:, :, n]  # (B, H, C)
        if readout is None:
            outputs.append(G[..., None] * (qc[:, :, n] @ A) - intra[:, :, n] @ U)  # (B, H, C, V)
        else:  # every A_t of the chunk, for its read-out
            A_t = G[..., None, None] * A[:, :, None] - torch.einsum(
                "bhtj,bhjk,bhjv->bhtkv", gamma[:, :, n], kc[:, :, n], U
            )  # (B, H, C, K, V)
            W_t = readout(A_t)
            outputs.append(torch.einsum("bhtk,bhtkv->bhtv", qc[:, :, n], W_t))
        to_end = gamma[:, :, n, -1]  # (B, H, C): Gamma[C, j]
        A = G[..., -1, None, None] * A - (kc[:, :, n] * to_end[..., None]).transpose(-1, -2) @ U
    o = from_chunks(torch.stack(outputs, dim=2), T)  # (B, T, H, V)
    return o.to(q.dtype), (A if output_final_state else None)


GATE_DTYPES = (torch.float32,)  # gates may stay fp32 when q/k/v are half precision


def check_memory_inputs(op: str, q, k, v, gates: dict[str, torch.Tensor], *, scale=None) -> None:
    """q, k (B, T, H, K), v (B, T, H, V) of one dtype and device; each gate (B, T, H) in q's dtype or fp32;
    ``g`` a log retention (<= 0) and ``eta`` a learning rate (>= 0); then the causal value rules
    (:func:`check_attention_values`: ``scale``, no non-finite future k/v)."""
    check_tensor("q", q, 4, "(B, T, H, K)")
    check_tensor("k", k, 4, "(B, T, H, K)")
    check_tensor("v", v, 4, "(B, T, H, V)")
    check_same("q", q, k=k, v=v)
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have q's shape (B, T, H, K) {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must have shape (B, T, H, V) with (B, T, H) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")  # fmt: skip
    if q.shape[1] == 0:
        raise ValueError(f"{op}: sequence length must be >= 1, got q {tuple(q.shape)}")
    check_heads(q.shape[2])
    for name, x in gates.items():
        check_tensor(name, x, 3, "(B, T, H)")
        if x.shape != q.shape[:3]:
            raise ValueError(
                f"{op}: {name} must have shape (B, T, H) = {tuple(q.shape[:3])}, got {tuple(x.shape)}"
            )
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}; move them to one device")
        if x.dtype != q.dtype and x.dtype not in GATE_DTYPES:
            raise TypeError(f"{op}: {name} must have q's dtype ({q.dtype}) or float32, got {x.dtype}")
    check_log_gate("g", gates["g"].detach())
    eta = gates["eta"].detach()
    if not torch.compiler.is_compiling() and eta.numel() and not bool((eta >= 0).all()):  # False for NaN
        raise ValueError(
            f"{op}: eta (the memory's learning rate) must be >= 0, got min {float(eta.min()):.4g}"
        )
    check_attention_values(op, q.shape[1], scale=scale, k=k, v=v)


def memory_op(
    op: str,
    psi: BiasGradient,
    readout: Readout | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    extra: tuple[torch.Tensor, ...] = (),
    *,
    scale: float | None,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
    backend: str,
    memory: str = "matrix",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the Miras memory ``op`` with bias gradient ``psi`` and read-out ``readout`` on checked inputs.

    q, k (B, T, H, K); v (B, T, H, V); g (B, T, H) log retention (alpha = exp(g)); eta (B, T, H) learning
    rate; extra: more (B, T, H) per-token terms psi reads (Yaad's threshold); initial_state (B, H, K, V)
    the memory before the first token (the unnormalised A). Returns o (B, T, H, V) in q's dtype and the
    final A (B, H, K, V) fp32 or None.

    memory: "matrix", or "mlp", the paper's MLP memory (:mod:`gatelab.ops.common.mlp_memory`): then
    initial_state is required, the pair of accumulators (W1 (B, H, V, E), W2 (B, H, E, K)), V = K, and the
    read-out applies to each weight; its reference is its chunk form at chunk 1 (the token recurrence).
    """
    check_choice("memory", memory, ("matrix", "mlp"))
    if memory == "mlp":
        check_mlp_state(op, q, v, initial_state)
        if scale is not None:
            raise ValueError(f"{op}: the MLP memory reads M(q) without a query scale; got scale={scale!r}")
        check_linear_options(op, q, v, None, cu_seqlens, chunk_size)
        chunked, options = functools.partial(mlp_memory_chunk, psi, readout), {}
        reference = functools.partial(chunked, chunk_size=1)  # the token recurrence
    else:
        check_linear_options(op, q, v, initial_state, cu_seqlens, chunk_size)
        chunked, options = functools.partial(memory_chunk, psi, readout), {"scale": scale}
        reference = functools.partial(memory_reference, psi, readout)
    functions = {"reference": reference, "chunk": chunked, "recurrent": reference}
    return run_linear(
        op, backend, functions, (q, k, v, g, eta, *extra), chunk_size=chunk_size, initial_state=initial_state,
        output_final_state=output_final_state, cu_seqlens=cu_seqlens, auto_order=("chunk",), **options,
    )  # fmt: skip


__all__ = [
    "lq_normalize",
    "memory_step",
    "memory_reference",
    "memory_chunk",
    "check_memory_inputs",
    "memory_op",
]
