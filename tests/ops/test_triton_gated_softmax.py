"""The fused gated softmax kernel against the fp32 reference: output and every gradient (q, k, v, gate).

Runs on a GPU when there is one, else on CPU under the Triton interpreter at tiny shapes.
"""

import pytest
import torch
from helpers import DEVICE, triton_interpreted

from gatelab import ops
from gatelab.ops.gated_softmax.reference import gated_softmax_reference
from gatelab.testing import compare_grads, nan_poison

with triton_interpreted():
    triton = pytest.importorskip(
        "triton", reason="triton is not installed; the Triton kernels cannot be tested"
    )
    from gatelab.ops.gated_softmax.triton import gated_softmax_triton

pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_interpreter")]


# (B, T, S, H, Hkv, D, V, gate width, gate_fn, causal): awkward lengths, D=60 (masked to 64), GQA,
# decoding (T=1 with a cache, bottom-right causal), value dim != key dim, headwise and elementwise gates,
# both activations.
CASES = [
    (1, 63, 63, 2, 2, 60, 60, 60, "sigmoid", True),
    (3, 17, 17, 4, 2, 16, 16, 1, "silu", True),
    (1, 1, 37, 2, 1, 32, 32, 32, "sigmoid", True),
    (2, 20, 33, 2, 2, 32, 16, 1, "sigmoid", False),
    (1, 19, 19, 2, 1, 16, 32, 32, "silu", False),
]


def _inputs(B, T, S, H, Hkv, D, width, V=None):
    V = V or D
    shapes = dict(q=(B, T, H, D), k=(B, S, Hkv, D), v=(B, S, Hkv, V), gate=(B, T, H, width))
    return {name: torch.randn(shape, device=DEVICE).requires_grad_() for name, shape in shapes.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}T{}S{}H{}kv{}D{}V{}g{}-{}-{}".format(*c))
def test_matches_reference(case, dtype):
    B, T, S, H, Hkv, D, V, width, gate_fn, causal = case
    inputs = _inputs(B, T, S, H, Hkv, D, width, V)
    with nan_poison():
        compare_grads(
            inputs,
            lambda x: gated_softmax_triton(**x, causal=causal, gate_fn=gate_fn),
            lambda x: gated_softmax_reference(**x, causal=causal, gate_fn=gate_fn),
            dtype,
        )


def test_gate_closed_and_open():
    """A closed sigmoid gate silences the output; a wide-open one gives plain attention (and its gradients)."""
    x = _inputs(1, 9, 9, 2, 2, 16, 16)
    shut = gated_softmax_triton(x["q"], x["k"], x["v"], torch.full_like(x["gate"], -60.0))
    assert shut.abs().max() < 1e-20
    wide = gated_softmax_triton(x["q"], x["k"], x["v"], torch.full_like(x["gate"], 60.0))
    plain = ops.softmax(x["q"], x["k"], x["v"], backend="reference")
    torch.testing.assert_close(wide, plain, rtol=1e-4, atol=1e-5)


def test_dispatcher_selects_triton():
    x = _inputs(1, 5, 5, 2, 2, 16, 1)
    o = ops.gated_softmax(x["q"], x["k"], x["v"], x["gate"], backend="triton")
    ref = gated_softmax_reference(x["q"], x["k"], x["v"], x["gate"])
    torch.testing.assert_close(o, ref, rtol=1e-4, atol=1e-5)


def test_rejects_unsupported_gate_fn():
    x = _inputs(1, 3, 3, 1, 1, 16, 1)
    with pytest.raises(ValueError, match="gate_fn"):
        gated_softmax_triton(x["q"], x["k"], x["v"], x["gate"], gate_fn="ns_sigmoid")
