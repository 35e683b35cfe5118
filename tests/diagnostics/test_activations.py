import pytest
import torch

from gatelab.lab.diagnostics import (
    gate_statistics,
    kurtosis,
    massive_activation_stats,
    sequence_outlier_stats,
    token_kurtosis,
)


def test_kurtosis_known_values():
    assert float(kurtosis(torch.tensor([1.0, -1.0, 1.0, -1.0]))) == pytest.approx(1.0)
    # a Bernoulli(p) variable has Pearson kurtosis (1 - 3 p (1 - p)) / (p (1 - p))
    n = 50
    x = torch.zeros(n)
    x[7] = 3.0
    p = 1 / n
    assert float(kurtosis(x)) == pytest.approx((1 - 3 * p * (1 - p)) / (p * (1 - p)), rel=1e-5)
    g = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    assert float(kurtosis(g)) == pytest.approx(3.0, abs=0.05)


def test_kurtosis_along_a_dim_and_scale_invariance():
    x = torch.randn(3, 40)
    per_row = kurtosis(x, dim=-1)
    assert per_row.shape == (3,)
    for i in range(3):
        assert float(per_row[i]) == pytest.approx(float(kurtosis(x[i])), rel=1e-5)
    torch.testing.assert_close(kurtosis(5 * x + 2, dim=-1), per_row, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(token_kurtosis(x.view(3, 1, 40)), per_row.view(3, 1))


def test_sequence_outlier_stats_are_per_sequence():
    out = torch.zeros(2, 5, 4)
    out[0, 3, 1] = -7.0  # one outlier in sequence 0
    out[1] = torch.tensor([1.0, -1.0]).repeat(10).view(5, 4)
    norm, kurt = sequence_outlier_stats(out)
    torch.testing.assert_close(norm, torch.tensor([7.0, 1.0]))
    p = 1 / 20
    assert float(kurt[0]) == pytest.approx((1 - 3 * p * (1 - p)) / (p * (1 - p)), rel=1e-5)
    assert float(kurt[1]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="block_out"):
        sequence_outlier_stats(torch.zeros(5, 4))


def test_massive_activation_stats():
    h = torch.tensor([[[1.0, -2.0, 3.0], [-100.0, 2.0, 2.0]]])  # |h| sorted: 1 2 2 2 3 100
    stats = massive_activation_stats(h)
    assert stats["max"] == 100.0
    assert stats["median"] == 2.0  # torch's median: the lower of the two middle values
    assert stats["ratio"] == 50.0


def test_gate_statistics():
    gate = torch.tensor([0.0, 0.05, 0.1, 0.5, 1.0, 0.09, 0.2, 0.06]).view(2, 1, 2, 2)
    stats = gate_statistics(gate)
    assert stats["mean"] == pytest.approx(2.0 / 8)
    assert stats["frac_below"] == pytest.approx(4 / 8)  # 0.0, 0.05, 0.09, 0.06 (0.1 is not below)
    assert stats["count"] == 8
    with pytest.raises(ValueError, match="gate"):
        gate_statistics(torch.zeros(0))


def test_channel_maxima_finds_the_channel_and_its_token():
    from gatelab.lab.diagnostics import channel_maxima

    h = torch.randn(2, 4, 8) * 0.1
    h[1, 2, 5] = -30.0  # a massive activation in channel 5, on token 2 of sequence 1
    values, where = channel_maxima(h)
    assert values.shape == (8,) and int(values.argmax()) == 5 and float(values[5]) == 30.0
    assert int(where[5]) == 1 * 4 + 2
    torch.testing.assert_close(values, h.abs().amax(dim=(0, 1)))
    with pytest.raises(ValueError, match=r"\(B, T, d_model\)"):
        channel_maxima(h[0])
