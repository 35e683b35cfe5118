"""Helpers several test files share; tests/ is on sys.path because it holds the root conftest.py.

The trainer: a tiny MQAR task (``MQAR_TINY``), LM (``tiny_lm``) and TrainConfig (``train_config``).
Linear attention: ``detached`` inputs, the chunk-against-reference check of gla and lightning. Sparse
softmax attention (hip, psa): inputs, shapes and the checks against dense attention and against the
reference backend. Triton: the device, and importing
kernels under the interpreter on CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

from gatelab.ops.softmax import softmax
from gatelab.testing import TOLERANCE, assert_close, compare_grads, nan_poison


def detached(tensors: dict) -> dict:
    """The same named tensors without autograd history (None stays None)."""
    return {name: (None if t is None else t.detach()) for name, t in tensors.items()}


def check_chunk_matches_reference(op, inputs: dict, chunk_size: int, dtype: torch.dtype) -> None:
    """op(q, k, v, gate, initial_state=h0, ...) with backend "chunk" against "reference": output, final
    state and every gradient, fresh allocations NaN-poisoned. ``inputs`` holds q, k, v, the gate and h0 in
    that order; they are rounded to ``dtype`` and given to both sides in fp32, so the error measured is
    the implementation's, not the rounding of the inputs."""
    tensors = {name: t.to(dtype).float().requires_grad_() for name, t in inputs.items()}

    def run(backend):
        def fn(x):
            q, k, v, gate, h0 = x.values()
            return op(
                q,
                k,
                v,
                gate,
                initial_state=h0,
                output_final_state=True,
                chunk_size=chunk_size,
                backend=backend,
            )

        return fn

    with nan_poison():
        compare_grads(tensors, run("chunk"), run("reference"), dtype)


# Sparse attention ------------------------------------------------------------------------------------

SPARSE_SHAPES = [(1, 1, 2, 16), (3, 63, 2, 60), (2, 65, 4, 32)]  # (B, T, H, D)

# (shape, dtype, block_size_q, causal): every shape, dtype, query block and mask direction
SPARSE_FLEX_CASES = [
    ((1, 1, 2, 16), torch.float32, 1, True),
    ((3, 63, 2, 60), torch.float32, 1, True),
    ((3, 63, 2, 60), torch.bfloat16, 16, True),
    ((2, 65, 4, 32), torch.bfloat16, 1, True),
    ((2, 65, 4, 32), torch.float32, 16, False),
    ((3, 63, 2, 60), torch.bfloat16, 1, False),
]


def qkv_inputs(B, T, H, D, Hkv=None, dtype=torch.float32):
    """q, k, v rounded to ``dtype`` (so a reference in fp32 sees the very values the fast path sees)."""
    Hkv = Hkv or H
    q, k, v = torch.randn(B, T, H, D), torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
    return tuple(x.to(dtype) for x in (q, k, v))


def check_dense_when_nothing_is_pruned(op, shape, label: str, **options) -> None:
    """``op`` with options that keep every key is dense softmax attention: the reference backend's output
    and every gradient (GQA with one key/value head when H > 1), and the flex backend's output."""
    B, T, H, D = shape
    causal = options["causal"]
    tensors = dict(zip("qkv", qkv_inputs(B, T, H, D, Hkv=1 if H > 1 else None)))
    for t in tensors.values():
        t.requires_grad_(True)
    compare_grads(
        tensors,
        lambda x: op(x["q"], x["k"], x["v"], backend="reference", **options),
        lambda x: softmax(x["q"], x["k"], x["v"], causal=causal, backend="reference"),
        torch.float32,
    )
    with torch.no_grad():
        o = op(*tensors.values(), backend="flex", **options)
    assert_close(label, o, softmax(*tensors.values(), causal=causal, backend="reference"))


def check_flex_matches_reference(op, shape, dtype, label: str, pruned: bool, **options) -> None:
    """The flex backend in ``dtype`` against the fp32 reference on the same (rounded) inputs; when
    ``pruned`` (keys are dropped at this length), the reference must also differ from dense attention."""
    B, T, H, D = shape
    q, k, v = qkv_inputs(B, T, H, D, dtype=dtype)
    with torch.no_grad():
        o = op(q, k, v, backend="flex", **options)
    expected = op(q.float(), k.float(), v.float(), backend="reference", **options)
    assert o.dtype == dtype
    assert_close(label, o.float(), expected, dtype)
    if pruned:
        dense = softmax(q.float(), k.float(), v.float(), causal=options["causal"], backend="reference")
        assert (expected - dense).abs().max() > 10 * TOLERANCE[dtype]


def check_decode_matches_parallel(op, **options) -> None:
    """Each query alone against the keys up to it (decoding) gives the parallel pass's output."""
    q, k, v = qkv_inputs(2, 40, 2, 16)
    full = op(q, k, v, **options)
    steps = [op(q[:, t : t + 1], k[:, : t + 1], v[:, : t + 1], **options) for t in range(40)]
    assert_close("decode", torch.cat(steps, dim=1), full)


# Triton ----------------------------------------------------------------------------------------------

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"


@contextlib.contextmanager
def triton_interpreted():
    """Import Triton kernels inside this block: on CPU they are built as interpreted functions, which
    needs TRITON_INTERPRET=1 at their import. The variable is removed again afterwards, so that
    backend="auto" in the rest of the suite keeps choosing the CPU paths; the ``triton_interpreter``
    fixture (tests/ops/conftest.py) sets it only while the kernel tests run."""
    saved = os.environ.get("TRITON_INTERPRET")
    if INTERPRET:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if INTERPRET and saved is None:
            del os.environ["TRITON_INTERPRET"]


def check_mixer_backends_agree(mixer, x: torch.Tensor, backend: str, reference: str = "reference") -> None:
    """A vision mixer run with ``backend`` against its fp32 ``reference`` backend on the same weights:
    output, the input's gradient and every parameter's gradient, under one random cotangent."""
    from gatelab.testing import assert_close

    cotangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    results = {}
    for name in (backend, reference):
        mixer.zero_grad()
        mixer.config.backend = name
        xi = x.detach().clone().requires_grad_()
        y, _ = mixer(xi)
        (y * cotangent).sum().backward()
        grads = {n: p.grad.clone() for n, p in mixer.named_parameters()}
        results[name] = (y.detach(), xi.grad, grads)
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = results[backend], results[reference]
    assert_close(f"{backend} output", y, y_ref, torch.float32)
    assert_close(f"{backend} dx", dx, dx_ref, torch.float32)
    for n in grads_ref:
        assert_close(f"{backend} d{n}", grads[n], grads_ref[n], torch.float32)


def check_lm_decodes_like_the_full_pass(model, idx: torch.Tensor, prefix: int, name: str) -> None:
    """An LM (eval mode) fed idx[:, :prefix] and then one token at a time with its states gives the logits
    of one full forward pass over idx (B, T)."""
    with torch.no_grad():
        full, _ = model(idx)
        logits, states = model(idx[:, :prefix])
        steps = [logits]
        for t in range(prefix, idx.shape[1]):
            logits, states = model(idx[:, t : t + 1], states)
            steps.append(logits)
    assert_close(f"{name} LM decode", torch.cat(steps, dim=1), full, torch.float32)


MQAR_TINY = {"vocab_size": 40, "seq_len": 16, "num_kv_pairs": 2}  # make_task("mqar", **MQAR_TINY)


def tiny_lm(seed=0):
    """A 2-layer d=16 softmax LM for MQAR_TINY."""
    from gatelab.lab.models.lm import LM, LMConfig

    return LM(LMConfig(vocab_size=40, d_model=16, n_layers=2, n_heads=2, max_seq_len=16, seed=seed))


def train_config(out=None, **overrides):
    """A TrainConfig of 6 steps of batch 8, evaluated every 3 steps on one batch, no progress bar."""
    from gatelab.lab.train import TrainConfig

    options = {
        "steps": 6,
        "batch_size": 8,
        "warmup": 2,
        "eval_every": 3,
        "eval_batches": 1,
        "progress": False,
    }
    return TrainConfig(out_dir=None if out is None else str(out), **{**options, **overrides})
