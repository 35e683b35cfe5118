"""Neighborhood attention: the mask against a brute-force construction of NATTEN's semantics, every backend
against the fp32 reference (outputs, and gradients where the backend has a backward), clear errors."""

import itertools
import math

import pytest
import torch

from gatelab import ops
from gatelab.ops.common.masks import attention_mask
from gatelab.ops.neighborhood import neighborhood_mask
from gatelab.ops.neighborhood.flex import neighborhood_flex
from gatelab.testing import assert_close, compare_grads, nan_poison


def brute_force_1d(L, k, s, d, causal):
    """Visible key sets per query, written from NATTEN's description with plain Python lists."""
    visible = []
    for x in range(L):
        members = list(range(x % d, L, d))  # the query's dilation group
        xi, Lg = members.index(x), len(members)
        run_start = (xi // s) * s
        leader = min(run_start + (s - 1 if causal else s // 2), Lg - 1)
        if causal:
            window = range(max(0, leader - k + 1), xi + 1)
        else:
            lo = leader - k // 2
            lo = max(0, min(lo, Lg - k))  # shift inward so the window holds k keys
            window = range(lo, lo + k)
        visible.append({members[j] for j in window})
    return visible


def brute_force(spatial, k, s, d, causal):
    per_dim = [brute_force_1d(L, *args) for L, *args in zip(spatial, k, s, d, causal)]
    coords = list(itertools.product(*(range(L) for L in spatial)))
    index = {c: i for i, c in enumerate(coords)}
    mask = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for qc in coords:
        for kc in itertools.product(*(sorted(per_dim[i][qc[i]]) for i in range(len(spatial)))):
            mask[index[qc], index[kc]] = True
    return mask


GRID_1D = [
    # (L, kernel, stride, dilation): odd and even kernels, L not divisible by kernel or stride
    (L, k, s, d)
    for L in (7, 10, 13)
    for k in (1, 2, 3, 4, 5)
    for s in sorted({1, 2, k})
    for d in (1, 2, 3)
    if s <= k and k * d <= L
]


@pytest.mark.parametrize("causal", [False, True])
def test_mask_1d_matches_brute_force(causal):
    for L, k, s, d in GRID_1D:
        got = neighborhood_mask((L,), (k,), (s,), (d,), (causal,))
        want = brute_force((L,), (k,), (s,), (d,), (causal,))
        assert torch.equal(got, want), f"L={L} k={k} s={s} d={d} causal={causal}"


@pytest.mark.parametrize(
    "spatial,k,s,d,causal",
    [
        ((7, 9), (3, 4), (1, 2), (1, 2), (False, False)),
        ((8, 6), (4, 3), (4, 3), (1, 1), (True, False)),
        ((5, 11), (2, 5), (2, 3), (2, 1), (False, True)),
        ((4, 5, 6), (3, 2, 3), (2, 1, 3), (1, 2, 2), (True, False, True)),
        ((6, 4, 7), (6, 4, 3), (5, 1, 2), (1, 1, 2), (False, False, False)),
    ],
)
def test_mask_nd_matches_brute_force(spatial, k, s, d, causal):
    assert torch.equal(neighborhood_mask(spatial, k, s, d, causal), brute_force(spatial, k, s, d, causal))


def test_mask_known_cases():
    # classic NA, kernel 3 on 7 tokens: clamped at the borders, centred inside
    m = neighborhood_mask((7,), (3,), (1,), (1,), (False,))
    assert m[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert m[3].nonzero().flatten().tolist() == [2, 3, 4]
    assert m[6].nonzero().flatten().tolist() == [4, 5, 6]
    # even kernel: one more key on the left
    m = neighborhood_mask((8,), (4,), (1,), (1,), (False,))
    assert m[3].nonzero().flatten().tolist() == [1, 2, 3, 4]
    # every non-causal query sees exactly prod(kernel) keys
    m = neighborhood_mask((9, 10), (3, 4), (2, 3), (2, 1), (False, False))
    assert (m.sum(1) == 12).all()
    # stride == kernel on divisible sizes: blocked attention (block-diagonal after sorting by block)
    m = neighborhood_mask((8,), (4,), (4,), (1,), (False,))
    assert torch.equal(m, torch.block_diag(torch.ones(4, 4), torch.ones(4, 4)).bool())
    # kernel == size: full attention; 1D causal with stride 1 is a causal sliding window
    assert neighborhood_mask((5, 6), (5, 6), (1, 1), (1, 1), (False, False)).all()
    assert torch.equal(
        neighborhood_mask((11,), (4,), (1,), (1,), (True,)), attention_mask(11, 11, causal=True, window=4)
    )


def _inputs(shape, H, Hkv, D, V, dtype, extra=0):
    B, spatial = shape[0], shape[1:]
    q = torch.randn(B, *spatial, H, D)
    k = torch.randn(B, *spatial, Hkv, D)
    v = torch.randn(B, *spatial, Hkv, V)
    ek = torch.randn(B, extra, Hkv, D) if extra else None
    ev = torch.randn(B, extra, Hkv, V) if extra else None
    return {"q": q, "k": k, "v": v, "ek": ek, "ev": ev}


CASES = [
    # (shape (B, *spatial), options, H, Hkv, D, V, extra keys)
    ((3, 1), dict(kernel_size=1), 2, 2, 8, 8, 0),
    ((2, 63), dict(kernel_size=7, dilation=3, causal=True), 4, 2, 60, 60, 0),
    ((1, 65), dict(kernel_size=8, stride=4), 2, 1, 16, 12, 3),
    ((2, 7, 9), dict(kernel_size=(3, 4), stride=(2, 1), dilation=(2, 1)), 2, 2, 16, 16, 0),
    (
        (1, 4, 5, 6),
        dict(kernel_size=(3, 2, 3), causal=(True, False, False), dilation=(1, 2, 1)),
        2,
        2,
        8,
        8,
        2,
    ),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_sdpa_matches_reference_with_grads(case, dtype):
    shape, options, H, Hkv, D, V, extra = case
    tensors = _inputs(shape, H, Hkv, D, V, dtype, extra)
    for t in tensors.values():
        if t is not None:
            t.requires_grad_(True)

    def run(backend):
        def fn(x):
            return ops.neighborhood(
                x["q"],
                x["k"],
                x["v"],
                additional_keys=x["ek"],
                additional_values=x["ev"],
                backend=backend,
                **options,
            )

        return fn

    compare_grads(tensors, run("sdpa"), run("reference"), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_eager_flex_matches_reference(case, dtype):
    shape, options, H, Hkv, D, V, extra = case
    x = _inputs(shape, H, Hkv, D, V, dtype, extra)
    ref = ops.neighborhood(
        x["q"],
        x["k"],
        x["v"],
        additional_keys=x["ek"],
        additional_values=x["ev"],
        backend="reference",
        **options,
    )
    cast = {n: (t.to(dtype) if t is not None else None) for n, t in x.items()}
    with nan_poison():  # fresh allocations start as NaN: an unwritten output would show
        o = ops.neighborhood(
            cast["q"],
            cast["k"],
            cast["v"],
            additional_keys=cast["ek"],
            additional_values=cast["ev"],
            backend="flex",
            **options,
        )
    assert o.dtype == dtype
    assert_close("flex", o.float(), ref, dtype)


def test_flex_tile_major_eager_and_compiled():
    # 2D map in 8x8 tiles (block 64): the tile-major mask_mod (eager) and the block mask (compiled kernel,
    # which skips blocks) must both reproduce the reference.
    x = _inputs((2, 16, 24), 2, 2, 16, 16, torch.float32, extra=3)
    options = dict(kernel_size=(5, 7), stride=(1, 2), dilation=(1, 2), causal=(False, False))
    ref = ops.neighborhood(
        x["q"],
        x["k"],
        x["v"],
        additional_keys=x["ek"],
        additional_values=x["ev"],
        backend="reference",
        **options,
    )
    from gatelab.ops.neighborhood import normalize_args

    k, s, d, c = normalize_args((16, 24), *options.values())
    for compile in (False, True):
        o = neighborhood_flex(
            x["q"], x["k"], x["v"], spatial=(16, 24), kernel_size=k, stride=s, dilation=d, causal=c,
            scale=16**-0.5, extra_k=x["ek"], extra_v=x["ev"], block_size=64, tile_major=True, compile=compile,
        )  # fmt: skip
        assert_close(f"flex compile={compile}", o, ref, torch.float32)


def test_auto_backend_trains_on_cpu_and_flex_refuses_backward():
    q = torch.randn(1, 6, 6, 2, 8, requires_grad=True)
    o = ops.neighborhood(q, q, q, kernel_size=3)  # auto: a backend with a backward
    o.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(RuntimeError, match="no backward on CPU"):
        ops.neighborhood(q, q, q, kernel_size=3, backend="flex")


def test_additional_keys_are_seen_by_every_query():
    x = _inputs((1, 9), 1, 1, 4, 4, torch.float32, extra=1)
    x["ek"] = x["q"][:, :1].clone() * 0 + 50.0 * x["q"].mean(1, keepdim=True)  # a strong global key
    o = ops.neighborhood(
        x["q"], x["k"], x["v"], kernel_size=3, additional_keys=x["ek"], additional_values=x["ev"]
    )
    o_local = ops.neighborhood(x["q"], x["k"], x["v"], kernel_size=3)
    assert (o - o_local).abs().amax(dim=(-1, -2)).min() > 0  # every query changed


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel_size=9), "kernel_size \\* dilation cannot exceed"),
        (dict(kernel_size=3, dilation=3), "kernel_size \\* dilation cannot exceed"),
        (dict(kernel_size=3, stride=4), "stride cannot be larger than kernel_size"),
        (dict(kernel_size=3, dilation=0), "dilation must be >= 1"),
        (dict(kernel_size=(3, 3, 3)), "one per spatial dim"),
        (dict(kernel_size=3, causal=(True,)), "causal"),
    ],
)
def test_clear_errors(kwargs, match):
    q = torch.randn(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match=match):
        ops.neighborhood(q, q, q, **kwargs)


def test_bad_tensors():
    q = torch.randn(1, 8, 8, 2, 4)
    with pytest.raises(ValueError, match="spatial"):
        ops.neighborhood(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0], kernel_size=1)
    with pytest.raises(ValueError, match="share"):
        ops.neighborhood(q, q[:, :4], q[:, :4], kernel_size=3)
    with pytest.raises(ValueError, match="together"):
        ops.neighborhood(q, q, q, kernel_size=3, additional_keys=torch.randn(1, 2, 2, 4))
    with pytest.raises(ValueError, match="unknown backend"):
        ops.neighborhood(q, q, q, kernel_size=3, backend="nope")


def test_reference_is_full_attention_when_kernel_covers_the_map():
    x = _inputs((2, 5, 6), 2, 2, 8, 8, torch.float32)
    o = ops.neighborhood(x["q"], x["k"], x["v"], kernel_size=(5, 6), backend="reference")
    full = ops.softmax(
        x["q"].flatten(1, 2), x["k"].flatten(1, 2), x["v"].flatten(1, 2), causal=False, backend="reference"
    )
    assert_close("full", o.flatten(1, 2), full, torch.float32)
    assert math.prod((5, 6)) == o.flatten(1, 2).shape[1]
