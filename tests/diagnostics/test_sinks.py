import math

import pytest
import torch

from gatelab.lab.diagnostics import (
    attention_entropy,
    first_token_share,
    uniform_entropy,
    uniform_first_token_share,
)


def causal_uniform(B, H, T):
    mask = torch.tril(torch.ones(T, T))
    return (mask / mask.sum(-1, keepdim=True)).expand(B, H, T, T).clone()


def test_all_attention_on_first_token_gives_share_one():
    attn = torch.zeros(2, 3, 7, 7)
    attn[..., 0] = 1.0
    torch.testing.assert_close(first_token_share(attn), torch.ones(3))
    torch.testing.assert_close(attention_entropy(attn), torch.zeros(3))


def test_uniform_attention_matches_the_uniform_baseline():
    T = 9
    attn = causal_uniform(2, 4, T)
    expected = sum(1 / (t + 1) for t in range(T)) / T
    assert uniform_first_token_share(T) == pytest.approx(expected)
    torch.testing.assert_close(first_token_share(attn), torch.full((4,), expected))
    expected_entropy = sum(math.log(t + 1) for t in range(T)) / T
    assert uniform_entropy(T) == pytest.approx(expected_entropy)
    torch.testing.assert_close(attention_entropy(attn), torch.full((4,), expected_entropy))


def test_share_is_per_head_and_averaged_over_queries():
    T = 4
    attn = causal_uniform(1, 2, T)
    attn[0, 1] = 0.0
    attn[0, 1, :, 0] = 1.0  # head 1: a perfect sink; head 0: uniform
    share = first_token_share(attn)
    assert share[0] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 4) / 4)
    assert share[1] == pytest.approx(1.0)


def test_cached_keys_shift_the_baseline():
    # 2 queries that see 3 and 4 keys (a prefix of 2 was cached): uniform share (1/3 + 1/4) / 2
    assert uniform_first_token_share(2, 4) == pytest.approx((1 / 3 + 1 / 4) / 2)
    assert uniform_entropy(2, 4) == pytest.approx((math.log(3) + math.log(4)) / 2)


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 4), torch.zeros(1, 1, 5, 4)])
def test_bad_attention_shapes_raise(bad):
    with pytest.raises(ValueError, match="attn"):
        first_token_share(bad)
    with pytest.raises(ValueError, match="attn"):
        attention_entropy(bad)


def test_unnormalised_rows_are_shares_of_absolute_weight():
    # a linear mixer's equivalent matrix: rows need not sum to 1 and may hold negative weights
    attn = torch.tensor([[[[2.0, 0.0], [-1.0, 3.0]]]])  # (1, 1, 2, 2)
    share = first_token_share(attn)
    assert float(share[0]) == pytest.approx((1.0 + 0.25) / 2)
    probs = causal_uniform(1, 1, 5)
    torch.testing.assert_close(first_token_share(3 * probs), first_token_share(probs))
    torch.testing.assert_close(attention_entropy(-2 * probs), attention_entropy(probs))
    zero = torch.zeros(1, 1, 3, 3)
    assert float(first_token_share(zero)[0]) == 0.0 and float(attention_entropy(zero)[0]) == 0.0


def test_key_share_sums_the_marked_keys():
    from gatelab.lab.diagnostics import key_share

    attn = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    keys = torch.zeros(2, 5, dtype=torch.bool)
    keys[:, 0] = True
    assert key_share(attn, keys) == pytest.approx(first_token_share(attn).tolist(), rel=1e-6)
    keys[0, 4] = True  # a different key per sequence: the share follows each sequence's own mark
    expected = (attn[0, :, :, [0, 4]].sum(-1).mean(-1) + attn[1, :, :, 0].mean(-1)) / 2
    assert key_share(attn, keys) == pytest.approx(expected.tolist(), rel=1e-6)
    assert key_share(attn, torch.ones(2, 5, dtype=torch.bool)) == pytest.approx([1.0] * 3)
    with pytest.raises(ValueError, match=r"bool mask of shape \(B, S\)"):
        key_share(attn, keys.float())
    with pytest.raises(ValueError, match=r"bool mask of shape \(B, S\)"):
        key_share(attn, keys[:, :4])


def test_uniform_key_share_is_the_key_share_of_uniform_attention():
    from gatelab.lab.diagnostics import key_share, uniform_key_share

    keys = torch.zeros(2, 6, dtype=torch.bool)
    keys[:, 0], keys[1, 3] = True, True
    causal = torch.tril(torch.ones(6, 6))
    attn = (causal / causal.sum(-1, keepdim=True)).expand(2, 1, 6, 6)
    assert uniform_key_share(keys) == pytest.approx(float(key_share(attn, keys)))
    assert uniform_key_share(keys[:1]) == pytest.approx(uniform_first_token_share(6))
    assert uniform_key_share(keys, causal=False) == pytest.approx(3 / 12)
    with pytest.raises(ValueError, match="bool mask of shape \\(B, T\\)"):
        uniform_key_share(keys.float())
