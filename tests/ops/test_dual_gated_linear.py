"""HER-Seg's linear attention: the matmul form against the dense fp32 reference (output and every gradient,
odd and non-square maps, batch 3), the limit without RoPE (plain ELU+1 linear attention, the LINA
reference), the 2D rotary embedding, clear errors."""

import pytest
import torch

from gatelab import ops
from gatelab.ops.dual_gated_linear import dual_gated_linear_weights, rope_2d
from gatelab.ops.lina import lina_reference
from gatelab.testing import assert_close, compare_grads


def inputs(B=3, H=5, W=7, h=2, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, H, W, h, D, generator=g, requires_grad=True) for n in ("q", "k", "v")}


@pytest.mark.parametrize("shape", [(5, 7), (4, 4), (1, 9), (6, 3)])
@pytest.mark.parametrize("rope", [True, False])
def test_matmul_matches_reference_with_gradients(shape, rope):
    tensors = inputs(H=shape[0], W=shape[1])
    compare_grads(
        tensors,
        lambda t: ops.dual_gated_linear(t["q"], t["k"], t["v"], rope=rope, backend="matmul"),
        lambda t: ops.dual_gated_linear(t["q"], t["k"], t["v"], rope=rope, backend="reference"),
        torch.float32,
    )


def test_without_rope_it_is_plain_elu_linear_attention():
    """(phi q sum phi k^T v / N) / (phi q mean phi k + eps) is LINA's phi q S / (phi q z + eps * N)."""
    t = inputs()
    B, H, W, h, D = t["q"].shape
    N = H * W
    o = ops.dual_gated_linear(t["q"], t["k"], t["v"], rope=False, eps=1e-6)
    flat = [x.reshape(B, N, h, D) for x in (t["q"], t["k"], t["v"])]
    ones = torch.ones(B, N, h)
    expected, _ = lina_reference(*flat, ones, ones, causal=False, feature_map="elu", eps=1e-6 * N)
    assert_close("no rope", o.reshape(B, N, h, D), expected, torch.float32)
    rows = dual_gated_linear_weights(t["q"], t["k"], rope=False, eps=0.0).sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_rope_rotates_pairs_by_row_then_column():
    C = 8  # two frequencies: pairs 0-1 turn with the row, pairs 2-3 with the column
    x = torch.zeros(1, 3, 4, C)
    x[..., 0::2] = 1.0  # every pair is the complex number 1
    out = rope_2d(x, base=10000.0)
    theta = torch.tensor([1.0, 10000.0**-0.5])
    for i in range(3):
        for j in range(4):
            angles = torch.cat([i * theta, j * theta])
            expected = torch.stack([torch.cos(angles), torch.sin(angles)], -1).flatten()
            torch.testing.assert_close(out[0, i, j], expected)
    # a rotation keeps the norm of each pair, and position (0, 0) is not rotated
    y = torch.randn(2, 3, 4, C)
    r = rope_2d(y)
    torch.testing.assert_close(r.view(2, 3, 4, 4, 2).norm(dim=-1), y.view(2, 3, 4, 4, 2).norm(dim=-1))
    torch.testing.assert_close(r[:, 0, 0], y[:, 0, 0])


def test_rope_scores_depend_on_relative_position_only():
    """RoPE(a at p) . RoPE(b at p + d) is the same for every p: shift a pair of tokens and the score stays."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    x = torch.zeros(1, 6, 6, 8)
    x[0, 1, 1], x[0, 2, 4] = a, b
    y = torch.zeros(1, 6, 6, 8)
    y[0, 3, 0], y[0, 4, 3] = a, b
    rx, ry = rope_2d(x), rope_2d(y)
    torch.testing.assert_close(rx[0, 1, 1] @ rx[0, 2, 4], ry[0, 3, 0] @ ry[0, 4, 3])


def test_errors():
    t = inputs()
    q, k, v = (t[n].detach() for n in ("q", "k", "v"))
    with pytest.raises(ValueError, match=r"q must have 5 dims \(B, H, W, h, D\)"):
        ops.dual_gated_linear(q[0], k, v)
    with pytest.raises(ValueError, match="one shape"):
        ops.dual_gated_linear(q, k[:, :4], v)
    with pytest.raises(ValueError, match="divisible by 4"):
        ops.dual_gated_linear(q[..., :3], k[..., :3], v, rope=True)
    with pytest.raises(ValueError, match="eps must be"):
        ops.dual_gated_linear(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="unknown backend"):
        ops.dual_gated_linear(q, k, v, backend="triton")
