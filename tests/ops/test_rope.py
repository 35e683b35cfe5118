"""RoPE: the three position layouts rotate alike, and relative positions are all that a score sees."""

import torch

from gatelab.ops.common.rope import apply_rope, rope_frequencies
from gatelab.testing import assert_close


def test_position_layouts_agree():
    torch.manual_seed(0)
    inv_freq = rope_frequencies(60, 10000.0)
    x = torch.randn(3, 7, 4, 60)
    pos = torch.arange(5, 12)
    shared = apply_rope(x, pos, inv_freq)
    assert_close("per row", apply_rope(x, pos.expand(3, -1), inv_freq), shared, torch.float32)
    assert_close(
        "per head", apply_rope(x, pos.view(1, -1, 1).expand(3, -1, 4), inv_freq), shared, torch.float32
    )
    per_head = torch.randint(0, 50, (3, 7, 4))
    rotated = apply_rope(x, per_head, inv_freq)
    for h in range(4):
        assert_close(
            f"head {h}",
            rotated[:, :, h : h + 1],
            apply_rope(x[:, :, h : h + 1], per_head[..., h], inv_freq),
            torch.float32,
        )


def test_scores_depend_on_relative_positions_only():
    torch.manual_seed(0)
    inv_freq = rope_frequencies(64, 10000.0)
    q, k = torch.randn(1, 1, 1, 64), torch.randn(1, 1, 1, 64)
    score = lambda i, j: (
        apply_rope(q, torch.tensor([i]), inv_freq) * apply_rope(k, torch.tensor([j]), inv_freq)
    ).sum()
    assert torch.allclose(score(9, 3), score(106, 100), atol=1e-4)
