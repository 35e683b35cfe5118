"""The Miras chunked definition written token by token, independent of gatelab.ops.common.memory: the
gradient of token t is taken at the memory of its chunk's start, everything else as the recurrence."""

import torch


def chunk_start_loop(q, k, v, g, eta, *extra, psi, readout, chunk_size):
    """q, k (B, T, H, K), v (B, T, H, V), g, eta and extra (B, T, H); psi(e, *extra) the bias gradient,
    readout(A) the memory read out of its accumulator. Returns o (B, T, H, V) and the final A."""
    B, T, H, K = q.shape
    A = torch.zeros(B, H, K, v.shape[-1])
    outputs = []
    for t in range(T):
        if t % chunk_size == 0:
            W0 = readout(A)
        error = torch.einsum("bhk,bhkv->bhv", k[:, t], W0) - v[:, t]
        update = eta[:, t, :, None] * psi(error, *(x[:, t, :, None] for x in extra))
        A = A * g[:, t].exp()[..., None, None] - k[:, t, :, :, None] * update[..., None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t] * K**-0.5, readout(A)))
    return torch.stack(outputs, dim=1), A
