"""Windowed retention with Manhattan decay: the windowed SDPA path against the whole-map dense reference
(output and every gradient; odd, non-square and padded maps, shifted windows, both modes, batch 3), the
decay's limits, window partition round trip, clear errors."""

import pytest
import torch

from gatelab import ops
from gatelab.mixers.gated_swin_rmt import rmt_log_decay
from gatelab.ops.gated_swin_rmt import axis_labels, manhattan_log_decay, window_partition, window_reverse
from gatelab.testing import assert_close, compare_grads

LOG_GAMMA = rmt_log_decay(3, 2.0, 4.0)


def inputs(B=3, H=9, W=11, h=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(B, H, W, h, D, generator=g, requires_grad=True) for n in ("q", "k", "v")}


@pytest.mark.parametrize("shape", [(9, 11), (8, 8), (5, 13), (3, 4)])
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("mode", ["axial", "full"])
def test_windows_match_reference_with_gradients(shape, shift, mode):
    options = dict(window_size=4, shift_size=shift, mode=mode)

    def run(backend):
        return lambda t: ops.gated_swin_rmt(t["q"], t["k"], t["v"], LOG_GAMMA, backend=backend, **options)

    compare_grads(inputs(H=shape[0], W=shape[1]), run("sdpa"), run("reference"), torch.float32)


def test_non_square_windows():
    t = {n: x.detach() for n, x in inputs(H=7, W=10).items()}
    options = dict(window_size=(3, 5), shift_size=(1, 2))
    a = ops.gated_swin_rmt(t["q"], t["k"], t["v"], LOG_GAMMA, backend="sdpa", **options)
    b = ops.gated_swin_rmt(t["q"], t["k"], t["v"], LOG_GAMMA, backend="reference", **options)
    assert_close("windows (3, 5)", a, b, torch.float32)


def test_decay_is_one_at_distance_zero_and_factorises_over_axes():
    H, W = 4, 5
    log_d = manhattan_log_decay(H, W, LOG_GAMMA)  # (h, N, N)
    assert torch.equal(log_d.diagonal(dim1=1, dim2=2), torch.zeros(3, H * W))  # D = gamma^0 = 1
    gamma = LOG_GAMMA.exp()
    D = log_d.exp().view(3, H, W, H, W)
    for t, s in [((0, 0), (3, 4)), ((1, 2), (2, 0)), ((3, 1), (0, 3))]:
        dy, dx = abs(t[0] - s[0]), abs(t[1] - s[1])
        torch.testing.assert_close(D[:, t[0], t[1], s[0], s[1]], gamma**dy * gamma**dx)
    assert (gamma < 1).all() and (gamma > 0).all() and (gamma.diff() > 0).all()  # later heads decay slower


def test_one_window_without_decay_is_axial_softmax_attention():
    """gamma = 1 and a window covering the map: width pass then height pass of plain softmax attention."""
    t = {n: x.detach() for n, x in inputs(B=2, H=4, W=5).items()}
    q, k, v = t["q"], t["k"], t["v"]
    o = ops.gated_swin_rmt(q, k, v, torch.zeros(3), window_size=8, mode="axial")
    scale = q.shape[-1] ** -0.5
    rows = torch.einsum("bijhd,bikhd->bhijk", q, k).mul(scale).softmax(-1)  # (B, h, H, W, W)
    o1 = torch.einsum("bhijk,bikhd->bijhd", rows, v)
    cols = torch.einsum("bijhd,bkjhd->bhjik", q, k).mul(scale).softmax(-1)  # (B, h, W, H, H)
    expected = torch.einsum("bhjik,bkjhd->bijhd", cols, o1)
    assert_close("axial softmax", o, expected, torch.float32)


def test_shifted_windows_keep_swin_regions_apart():
    labels = axis_labels(8, 4, 2)
    # rolled by -2: windows {2..5} and {6, 7, 0, 1}; 0 and 1 are rolled round, a region of their own
    assert labels[2] == labels[5] and labels[6] == labels[7] and labels[0] == labels[1]
    assert labels[1] != labels[2] and labels[6] != labels[0] and labels[5] != labels[6]
    assert len(set(axis_labels(3, 4, 2).tolist())) == 1  # an axis shorter than the window: one window


def test_window_partition_round_trip():
    x = torch.randn(2, 8, 12, 3, 5)
    w = window_partition(x, (4, 3))
    assert w.shape == (2, 2, 4, 12, 3, 5)
    torch.testing.assert_close(w[0, 1, 2].view(4, 3, 3, 5), x[0, 4:8, 6:9])
    assert torch.equal(window_reverse(w, (4, 3)), x)


def test_errors():
    t = {n: x.detach() for n, x in inputs().items()}
    q, k, v = t["q"], t["k"], t["v"]
    with pytest.raises(ValueError, match="log_gamma must be <= 0"):
        ops.gated_swin_rmt(q, k, v, torch.full((3,), 0.1))
    with pytest.raises(ValueError, match=r"log_gamma must have shape \(h,\) = \(3,\)"):
        ops.gated_swin_rmt(q, k, v, torch.zeros(2))
    with pytest.raises(ValueError, match="0 <= shift_size < window_size"):
        ops.gated_swin_rmt(q, k, v, LOG_GAMMA, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match="window_size must be an int or two ints"):
        ops.gated_swin_rmt(q, k, v, LOG_GAMMA, window_size=(4, 4, 4))
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.gated_swin_rmt(q, k, v, LOG_GAMMA, mode="diagonal")
    with pytest.raises(ValueError, match="one shape"):
        ops.gated_swin_rmt(q, k[:, :3], v, LOG_GAMMA)
