"""Test helpers shared by the test suite, the benchmarks and the GPU suite.

One per-dtype tolerance table; comparisons by relative RMS error (as flash-linear-attention's
``assert_close``), named so a failure says which tensor drifted.
"""

from __future__ import annotations

import torch

# Relative RMS error allowed between a fast path and the fp32 reference, by the fast path's dtype.
# Never loosen an entry to make one test pass: find out why it drifts.
TOLERANCE: dict[torch.dtype, float] = {
    torch.float64: 1e-9,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 2e-2,
}


def rel_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected||_rms / ||expected||_rms, in float64 (0 when both are zero)."""
    a, e = actual.detach().double(), expected.detach().double()
    num = (a - e).pow(2).mean().sqrt()
    den = e.pow(2).mean().sqrt()
    if den == 0:
        return float(num)
    return float(num / den)


def assert_close(
    name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None
) -> None:
    """Assert shapes match, there is no NaN/inf, and the relative RMS error is within TOLERANCE[dtype]."""
    dtype = dtype or actual.dtype
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: contains NaN or inf"
    err = rel_rms(actual, expected)
    tol = TOLERANCE[dtype]
    assert err <= tol, f"{name}: relative RMS error {err:.3g} > {tol:.1g} ({dtype})"


def compare_grads(tensors: dict[str, torch.Tensor], run_a, run_b, dtype: torch.dtype, seed: int = 0) -> None:
    """Run two implementations on copies of ``tensors`` (leaf inputs), backpropagate the same random
    cotangent through every output and compare outputs and every input gradient by name.

    run_a / run_b take the dict of inputs and return a tensor or a tuple of tensors (None entries skipped);
    run_b is the reference.
    """

    def run(fn, cast):
        inputs = {
            k: (v.detach().to(cast).requires_grad_(v.requires_grad) if v is not None else None)
            for k, v in tensors.items()
        }
        outs = fn(inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        gen = torch.Generator().manual_seed(seed)
        loss = 0
        for o in outs:
            if o is not None and o.requires_grad:
                cot = torch.randn(o.shape, generator=gen, dtype=torch.float32).to(o.device, o.dtype)
                loss = loss + (o * cot).sum()
        if isinstance(loss, torch.Tensor):
            loss.backward()
        grads = {k: v.grad for k, v in inputs.items() if v is not None and v.requires_grad}
        return outs, grads

    outs_a, grads_a = run(run_a, dtype)
    outs_b, grads_b = run(run_b, torch.float32)
    for i, (a, b) in enumerate(zip(outs_a, outs_b)):
        if a is None or b is None:
            assert a is None and b is None, f"output {i}: one implementation returned None"
            continue
        assert_close(f"output[{i}]", a.float(), b.float(), dtype)
    for k in grads_b:
        assert grads_a[k] is not None, f"d{k}: no gradient"
        assert_close(f"d{k}", grads_a[k].float(), grads_b[k].float(), dtype)


def nan_poison(enabled: bool = True):
    """Context manager: fill fresh torch.empty allocations with NaN so unwritten outputs show up."""
    import contextlib

    if not enabled:
        return contextlib.nullcontext()
    original = torch.empty

    def empty(*args, **kwargs):
        out = original(*args, **kwargs)
        if out.dtype.is_floating_point:
            out.fill_(float("nan"))
        return out

    @contextlib.contextmanager
    def ctx():
        torch.empty = empty
        try:
            yield
        finally:
            torch.empty = original

    return ctx()
