"""ContMix's dynamic-kernel aggregation: the gather path against the dense reference on the neighbourhood
mask (output and every gradient; odd, non-square maps, batch 3), uniform taps give the mean of each
clamped window (checked with explicit loops), clear errors."""

import pytest
import torch

from gatelab import ops
from gatelab.testing import compare_grads


def inputs(B=3, H=5, W=7, G=2, V=4, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    taps = torch.randn(B, H, W, G, K * K, generator=g).softmax(-1).requires_grad_()
    return {"taps": taps, "v": torch.randn(B, H, W, G, V, generator=g, requires_grad=True)}


@pytest.mark.parametrize("H, W, K", [(5, 7, 3), (9, 6, 5), (7, 7, 7), (6, 8, 4), (3, 11, 3)])
def test_gather_matches_reference_with_gradients(H, W, K):
    compare_grads(
        inputs(H=H, W=W, K=K),
        lambda t: ops.contmix(t["taps"], t["v"], kernel_size=K, backend="gather"),
        lambda t: ops.contmix(t["taps"], t["v"], kernel_size=K, backend="reference"),
        torch.float32,
    )


@pytest.mark.parametrize("backend", ["reference", "gather"])
def test_uniform_taps_average_each_clamped_window(backend):
    H, W, K = 6, 9, 5
    v = torch.randn(2, H, W, 3, 4)
    taps = torch.full((2, H, W, 3, K * K), 1.0 / (K * K))
    o = ops.contmix(taps, v, kernel_size=K, backend=backend)
    for i in range(H):
        for j in range(W):
            r0, c0 = min(max(i - K // 2, 0), H - K), min(max(j - K // 2, 0), W - K)  # shifted in at borders
            expected = v[:, r0 : r0 + K, c0 : c0 + K].mean((1, 2))
            torch.testing.assert_close(o[:, i, j], expected)


def test_a_one_hot_tap_reads_one_neighbour():
    H, W, K = 5, 6, 3
    v = torch.randn(1, H, W, 1, 2)
    taps = torch.zeros(1, H, W, 1, K * K)
    taps[..., K * K - 1] = 1.0  # the bottom-right tap of every window
    o = ops.contmix(taps, v, kernel_size=K)
    # an interior pixel reads (i + 1, j + 1); the last row and column are clamped windows, so they read themselves
    assert torch.equal(o[0, 1, 1], v[0, 2, 2]) and torch.equal(o[0, H - 1, W - 1], v[0, H - 1, W - 1])


def test_errors():
    t = {n: x.detach() for n, x in inputs().items()}
    with pytest.raises(ValueError, match=r"taps must have shape \(B, H, W, G, K \* K\)"):
        ops.contmix(t["taps"], t["v"], kernel_size=2)
    with pytest.raises(ValueError, match="kernel_size \\* dilation cannot exceed the input size"):
        ops.contmix(t["taps"][..., :1].expand(3, 5, 7, 2, 36), t["v"], kernel_size=6)
    with pytest.raises(ValueError, match=r"v must have 5 dims"):
        ops.contmix(t["taps"], t["v"][0], kernel_size=3)
    with pytest.raises(TypeError, match="dtype"):
        ops.contmix(t["taps"].double(), t["v"], kernel_size=3)
