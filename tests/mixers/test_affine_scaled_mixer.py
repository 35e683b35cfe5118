"""The affine-scaled mixer: alpha and beta as the paper defines them, the moving average of alpha."""

import torch

import gatelab
from gatelab.mixers.affine_scaled import linear_clipping


def build(**options):
    torch.manual_seed(0)
    return gatelab.make_mixer("affine_scaled", d_model=32, n_heads=4, **options)


def test_linear_clipping_slope_and_limits():
    x = torch.tensor([-7.0, -5.5, 0.0, 2.0, 5.5, 9.0], requires_grad=True)
    y = linear_clipping(x)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 0.0, 0.5, 0.7, 1.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 0.0, 0.1, 0.1, 0.0, 0.0]))


def test_weights_sum_to_the_moving_average_and_it_updates_in_train_mode_only():
    mixer = build().eval()
    x = torch.randn(2, 8, 32)
    mixer.alpha_ma.fill_(0.3)
    with torch.no_grad():
        _, _, internals = mixer(x, return_internals=True)
    torch.testing.assert_close(internals["attn"].sum(-1), torch.full((2, 4, 8), 0.3), rtol=1e-5, atol=1e-6)
    assert torch.equal(mixer.alpha_ma, torch.full((4,), 0.3))  # eval: no update
    mixer.train()
    with torch.no_grad():
        _, _, internals = mixer(x, return_internals=True)
    expected = 0.9 * 0.3 + 0.1 * internals["alpha"].mean(dim=(0, 1))
    torch.testing.assert_close(mixer.alpha_ma, expected)


def test_alpha_one_and_moving_average_one_is_softmax_attention():
    mixer = build().eval()
    softmax = gatelab.make_mixer("softmax", d_model=32, n_heads=4).eval()
    softmax.load_state_dict({k: v for k, v in mixer.state_dict().items() if k in softmax.state_dict()})
    with torch.no_grad():
        mixer.alpha_proj.weight.zero_()
        mixer.alpha_proj.weight[:, 0] = 1.0
        x = torch.randn(2, 8, 32)
        x[..., 0] = 10.0  # phi(x W_a) = clip(1.5) = 1
        mixer.alpha_ma.fill_(1.0)  # beta = 0
        y, _ = mixer(x)
        y_softmax, _ = softmax(x)
    torch.testing.assert_close(y, y_softmax, rtol=1e-5, atol=1e-6)
