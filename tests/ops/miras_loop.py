"""The Miras chunked definition written token by token, independent of gatelab.ops.common.memory: the
gradient of token t is taken at the memory of its chunk's start, everything else as the recurrence."""

import torch

from gatelab.testing import compare_grads, rel_rms


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


def check_chunk_one_is_the_recurrence(op, x: dict, **options) -> None:
    """op's chunk (at chunk 1) and recurrent backends against its reference: outputs, final memory and
    every input gradient of the leaf inputs ``x``."""

    def run(backend):
        return lambda t: op(**t, **options, backend=backend, chunk_size=1, output_final_state=True)

    compare_grads(x, run("chunk"), run("reference"), torch.float32)
    compare_grads(x, run("recurrent"), run("reference"), torch.float32)


def check_chunk_start_definition(op, x: dict, *, psi, readout, chunk_size: int, **options) -> None:
    """op's chunk backend against :func:`chunk_start_loop`, outputs and every gradient."""
    compare_grads(
        x,
        lambda t: op(**t, **options, backend="chunk", chunk_size=chunk_size, output_final_state=True),
        lambda t: chunk_start_loop(*t.values(), psi=psi, readout=readout, chunk_size=chunk_size),
        torch.float32,
    )


def chunk_gap(op, x: dict, chunk_size: int = 16, **options) -> float:
    """Relative RMS gap between op's chunked and recurrent outputs."""
    return rel_rms(op(**x, **options, backend="chunk", chunk_size=chunk_size)[0],
                   op(**x, **options, backend="reference")[0])  # fmt: skip


def memory_inputs(B=2, T=13, H=3, K=8, V=6, seed=0, eta_scale=0.3, delta=False) -> dict[str, torch.Tensor]:
    """Op inputs as the layers make them: unit q and k, retention in (0.82, 1], learning rate in
    (0, eta_scale); with ``delta`` a Huber threshold about the error norms (both of Yaad's branches run)."""
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    x = {
        "q": unit(B, T, H, K),
        "k": unit(B, T, H, K),
        "v": torch.randn(B, T, H, V, generator=gen),
        "g": -0.2 * torch.rand(B, T, H, generator=gen),
        "eta": eta_scale * torch.rand(B, T, H, generator=gen),
    }
    if delta:
        x["delta"] = 0.2 + torch.rand(B, T, H, generator=gen)
    return x
