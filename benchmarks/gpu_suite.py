"""GPU suite for the Triton kernels: correctness against the fp32 references, then forward and
forward+backward times side by side with SDPA (plain and with the eager sigmoid gate) and
flash-linear-attention 0.6.0 (when importable), triton.testing.do_bench medians. One table, one JSON.

    python benchmarks/gpu_suite.py              # one H200: B=1, H=16, D=128, bf16, T = 2048, 8192, 32768
    python benchmarks/gpu_suite.py --dry-run    # CPU, Triton interpreter, tiny shapes: checks the script runs

Writes $OUT/gpu_suite.json when OUT is set, else benchmarks/results/gpu_suite.json. Designed to finish in
under 8 minutes on one H200; each measurement is guarded, so one failure is recorded and the rest go on.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
import traceback

DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from gatelab.benchmarking import print_table, write_results  # noqa: E402
from gatelab.testing import TOLERANCE, rel_rms  # noqa: E402

ROWS: list[dict] = []
CHECKS: list[dict] = []


def bench_ms(fn, device: str) -> float:
    """Median milliseconds: do_bench on a GPU; a few timed calls under the interpreter."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    samples = []
    for _ in range(3 if device == "cuda" else 1):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return sorted(samples)[len(samples) // 2]


def guarded(what: str, fn):
    try:
        return fn()
    except Exception as error:  # record and go on: one broken contender must not hide the others
        print(f"FAILED {what}: {type(error).__name__}: {str(error)[:300]}", flush=True)
        traceback.print_exc(limit=2)
        return f"{type(error).__name__}: {str(error)[:200]}"
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def fwd_bwd(f, inputs):
    """A callable running f and, when inputs need grad, a backward of the output's sum."""

    def run():
        o = f()
        o = o[0] if isinstance(o, tuple) else o
        if any(x.requires_grad for x in inputs):
            for x in inputs:
                x.grad = None
            o.sum().backward()

    return run


# ---------------------------------------------------------------------------------------------- checks
def check(name: str, fast, reference, inputs: dict, dtype: torch.dtype) -> None:
    """Output and every gradient of `fast` (inputs in dtype) against `reference` (fp32)."""

    def run(fn, cast):
        x = {k: v.detach().to(cast).requires_grad_() for k, v in inputs.items()}
        out = fn(**x)
        out = out[0] if isinstance(out, tuple) else out
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(out.device, out.dtype)
        (out * cot).sum().backward()
        return {"o": out, **{f"d{k}": v.grad for k, v in x.items()}}

    got, want = run(fast, dtype), run(reference, torch.float32)
    errors = {k: rel_rms(got[k].float(), want[k].float()) for k in want}
    ok = all(torch.isfinite(got[k]).all() for k in got) and max(errors.values()) <= TOLERANCE[dtype]
    CHECKS.append({"kernel": name, "ok": bool(ok), **{k: round(e, 6) for k, e in errors.items()}})
    print(f"check {name}: {'ok' if ok else 'FAILED'} " + " ".join(f"{k}={e:.2e}" for k, e in errors.items()))


def correctness(device: str, dtype: torch.dtype, T: int, H: int, D: int) -> None:
    from gatelab.ops.gated_deltanet.reference import gated_deltanet_reference
    from gatelab.ops.gated_deltanet.triton import gated_deltanet_triton
    from gatelab.ops.gated_softmax.reference import gated_softmax_reference
    from gatelab.ops.gated_softmax.triton import gated_softmax_triton
    from gatelab.ops.gla.reference import gla_reference
    from gatelab.ops.gla.triton import gla_triton
    from gatelab.ops.lightning.reference import lightning_reference
    from gatelab.ops.lightning.triton import lightning_triton

    mk = lambda *s: torch.randn(*s, device=device)  # noqa: E731
    qkv = dict(q=mk(1, T, H, D), k=mk(1, T, H, D), v=mk(1, T, H, D))
    for kind, width in (("elementwise", D), ("headwise", 1)):
        x = {**qkv, "gate": mk(1, T, H, width)}
        name = f"gated_softmax gate={kind}"
        guarded(name, functools.partial(check, name, gated_softmax_triton, gated_softmax_reference, x, dtype))
    kv = dict(q=mk(1, T, H, D) * D**-0.5, k=mk(1, T, H, D) * D**-0.5, v=mk(1, T, H, D))
    g = F.logsigmoid(mk(1, T, H, D)) / 16
    guarded("check gla", lambda: check("gla", gla_triton, gla_reference, {**kv, "g": g}, dtype))
    decay = -torch.rand(H, device=device) * 0.1
    guarded(
        "check lightning",
        lambda: check("lightning", lightning_triton, lightning_reference, {**kv, "decay": decay}, dtype),
    )
    unit_keys = F.normalize(mk(1, T, H, D), dim=-1)  # the delta rule assumes unit-norm keys
    gdn = dict(
        q=kv["q"],
        k=unit_keys,
        v=kv["v"],
        g=F.logsigmoid(mk(1, T, H)) / 16,
        beta=torch.rand(1, T, H, device=device),
    )
    check_gdn = functools.partial(
        check, "gated_deltanet", gated_deltanet_triton, gated_deltanet_reference, gdn, dtype
    )
    guarded("check gated_deltanet", check_gdn)


# ---------------------------------------------------------------------------------------------- timing
def attention_flops(T: int, H: int, D: int, bwd: bool) -> float:
    return 4 * H * T * T * D * 0.5 * (3.5 if bwd else 1.0)  # causal: half the score matrix


def record(group: str, name: str, T: int, fn, device: str, flops: float | None = None) -> float | None:
    ms = guarded(f"{name} T={T}", lambda: bench_ms(fn, device))
    row = {"group": group, "name": name, "T": T}
    if isinstance(ms, float):
        row["ms"] = round(ms, 4)
        if flops:
            row["tflops"] = round(flops / ms / 1e9, 1)
    else:
        row["error"] = ms
    ROWS.append(row)
    return ms if isinstance(ms, float) else None


def time_softmax(T: int, H: int, D: int, device: str, dtype: torch.dtype) -> None:
    for bwd in (False, True):
        _time_softmax_once(T, H, D, device, dtype, bwd)


def _time_softmax_once(T: int, H: int, D: int, device: str, dtype: torch.dtype, bwd: bool) -> None:
    from gatelab.ops.gated_softmax.triton import gated_softmax_triton

    tag = "fwd+bwd" if bwd else "fwd"
    q, k, v, gate = (torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(4))
    qt, kt, vt, gt = (x.detach().transpose(1, 2).contiguous().requires_grad_(bwd) for x in (q, k, v, gate))
    flops = attention_flops(T, H, D, bwd)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # (B, H, T, D)

    base = record("softmax", f"sdpa {tag}", T, fwd_bwd(sdpa, (qt, kt, vt)), device, flops)
    eager = fwd_bwd(lambda: sdpa() * torch.sigmoid(gt), (qt, kt, vt, gt))
    ms_eager = record("softmax", f"sdpa * sigmoid(gate) eager {tag}", T, eager, device, flops)
    fused = fwd_bwd(lambda: gated_softmax_triton(q, k, v, gate), (q, k, v, gate))
    ms_fused = record("softmax", f"gated_softmax triton {tag}", T, fused, device, flops)
    for ms, row in ((ms_eager, ROWS[-2]), (ms_fused, ROWS[-1])):
        if ms and base:
            row["vs_sdpa"] = round(ms / base, 3)


def time_linear(T: int, H: int, D: int, device: str, dtype: torch.dtype, fla: dict) -> None:
    for bwd in (False, True):
        _time_linear_once(T, H, D, device, dtype, fla, bwd)


def _time_linear_once(T: int, H: int, D: int, device: str, dtype: torch.dtype, fla: dict, bwd: bool) -> None:
    from gatelab.ops.gated_deltanet.triton import gated_deltanet_triton
    from gatelab.ops.gla.triton import gla_triton
    from gatelab.ops.lightning.triton import lightning_triton

    tag = "fwd+bwd" if bwd else "fwd"
    q, k, v = (torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=bwd) for _ in range(3))
    gk = (F.logsigmoid(torch.randn(1, T, H, D, device=device)) / 16).requires_grad_(bwd)  # fp32 gates
    g = (F.logsigmoid(torch.randn(1, T, H, device=device)) / 16).requires_grad_(bwd)
    kn = F.normalize(k.detach().float(), dim=-1).to(dtype).requires_grad_(bwd)  # the delta rule's unit keys
    beta = torch.rand(1, T, H, device=device, dtype=dtype).requires_grad_(bwd)
    contenders = {  # group: (ours, name of the flash-linear-attention op, its arguments)
        "gla": (lambda: gla_triton(q, k, v, gk), "chunk_gla", (q, k, v, gk)),
        "lightning": (lambda: lightning_triton(q, k, v, g), "chunk_simple_gla", (q, k, v, g)),
        "gated_deltanet": (
            lambda: gated_deltanet_triton(q, kn, v, g, beta),
            "chunk_gated_delta_rule",
            (q, kn, v, g, beta),
        ),
    }
    for group, (ours, fla_name, inputs) in contenders.items():
        mine = record(group, f"{group} triton {tag}", T, fwd_bwd(ours, inputs), device)
        if fla_name in fla:
            peer_fn = fwd_bwd(functools.partial(fla[fla_name], *inputs), inputs)
            peer = record(group, f"fla {fla_name} {tag}", T, peer_fn, device)
            if mine and peer:
                ROWS[-2]["vs_fla"] = round(mine / peer, 3)


def load_fla() -> dict:
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.simple_gla import chunk_simple_gla
    except Exception as error:  # not installed, or no GPU driver: compare against nothing
        print(f"flash-linear-attention not available ({type(error).__name__}); timing gatelab alone")
        return {}
    return {
        "chunk_gla": chunk_gla,
        "chunk_simple_gla": chunk_simple_gla,
        "chunk_gated_delta_rule": chunk_gated_delta_rule,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    args = parser.parse_args()
    start = time.time()
    if args.dry_run:
        device, dtype, H, D, lengths, check_T = "cpu", torch.bfloat16, 2, 32, args.lengths or [64], 33
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_suite needs a CUDA device; use --dry-run to check it on CPU")
        device, dtype, H, D, lengths, check_T = (
            "cuda",
            torch.bfloat16,
            16,
            128,
            args.lengths or [2048, 8192, 32768],
            257,
        )
    print(f"gpu_suite: device={device} dtype={dtype} B=1 H={H} D={D} T={lengths}", flush=True)
    correctness(device, dtype, check_T, 2 if args.dry_run else 4, D)
    fla = {} if args.dry_run else load_fla()
    for T in lengths:
        time_softmax(T, H, D, device, dtype)
        time_linear(T, H, D, device, dtype, fla)
        print(f"T={T} done after {time.time() - start:.0f} s", flush=True)
    print_table(
        "checks (relative RMS error vs the fp32 reference)", CHECKS, list(CHECKS[0]) if CHECKS else []
    )
    print_table(
        f"gpu_suite: ms (median), B=1 H={H} D={D} {str(dtype).split('.')[-1]}, causal",
        ROWS, ["group", "name", "T", "ms", "tflops", "vs_sdpa", "vs_fla", "error"],
    )  # fmt: skip
    import triton

    meta = {"device": device, "dtype": str(dtype), "B": 1, "H": H, "D": D, "lengths": lengths, "dry_run": args.dry_run,
            "triton": triton.__version__, "checks": CHECKS, "seconds": round(time.time() - start, 1)}  # fmt: skip
    name = "gpu_suite_dry_run" if args.dry_run else "gpu_suite"  # a dry run never overwrites GPU figures
    path = write_results(name, ROWS, meta, out_dir=os.environ.get("OUT"))
    print(f"wrote {path} in {time.time() - start:.0f} s")
    if not all(c["ok"] for c in CHECKS) or len(CHECKS) < 5:
        sys.exit(1)


if __name__ == "__main__":
    main()
