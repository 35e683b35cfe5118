"""Compile every Triton kernel of gatelab for Hopper (sm_90) without a GPU: catches type errors, lowering
failures and register spills before a GPU session spends its minutes on them.

    python benchmarks/gpu_compile_check.py          # bf16 and fp32 variants, the launch shapes used on CUDA

Prints one line per kernel variant (registers, spills, shared memory) and exits non-zero if any fails.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # real kernels, not interpreted ones

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from gatelab.ops.gated_deltanet import triton as gdn  # noqa: E402
from gatelab.ops.gated_softmax import triton as gs  # noqa: E402
from gatelab.ops.gla import triton as gla  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
FLOAT_ARGS = {"qk_scale", "sm_scale", "scale"}


def compile_kernel(
    fn, dtype: str, fp32_pointers: set[str], constexprs: dict, warps: int = 4, stages: int = 2
):
    """Signature from the argument names: constexprs as given, fp32 pointers, other pointers in dtype."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in POINTERS[fn.fn.__name__]:
            signature[name] = "*fp32" if name in fp32_pointers else f"*{dtype}"
        else:
            signature[name] = "i32"
    source = triton.compiler.ASTSource(fn, signature, constexprs=constexprs)
    return triton.compile(source, target=TARGET, options={"num_warps": warps, "num_stages": stages})


POINTERS = {
    "_fwd_kernel": {"q", "k", "v", "gate", "o", "o_ungated", "lse"},
    "_bwd_preprocess_kernel": {"do", "o", "o_ungated", "gate", "do_ungated", "dgate", "delta"},
    "_bwd_dkdv_kernel": {"q", "k", "v", "do", "lse", "delta", "dk", "dv"},
    "_bwd_dq_kernel": {"q", "k", "v", "do", "lse", "delta", "dq"},
    "_fwd_h_kernel": {"k", "v", "gc", "h0", "h", "ht"},
    "_bwd_dh_kernel": {"q", "do", "gc", "dht", "dh", "dh0"},
    "_fwd_o_kernel": {"q", "k", "v", "gc", "h", "o"},
    "_bwd_dqkv_kernel": {"q", "k", "v", "gc", "h", "do", "dh", "dq", "dk", "dv"},
    "_recurrence_fwd_kernel": {"w", "u", "kd", "dl", "h0", "h", "delta", "ht"},
    "_recurrence_bwd_kernel": {
        "w",
        "kd",
        "dl",
        "h",
        "delta",
        "ddelta",
        "dh",
        "dht",
        "du",
        "dw",
        "dkd",
        "ddl",
        "dh0",
    },
}


def variants():
    """(label, kernel, fp32 pointers, constexprs, launch options) for D = K = V = 128."""
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        _, _, cfg = gs._configs(_Cuda(), 128, 128)
        for gate_fn, headwise in (("sigmoid", False), ("silu", True)):
            fwd = {k: v for k, v in cfg["fwd"].items() if k in ("BM", "BN")}
            yield (f"gated_softmax fwd {gate_fn} {'headwise' if headwise else 'elementwise'}", dtype, gs._fwd_kernel,
                   {"lse"}, dict(**fwd, BD=128, BV=128, CAUSAL=True, HEADWISE=headwise, GATE_FN=gate_fn,
                                 SAVE_UNGATED=gate_fn == "silu", PRECISION=precision), cfg["fwd"])  # fmt: skip
            yield (f"gated_softmax bwd preprocess {gate_fn}", dtype, gs._bwd_preprocess_kernel, {"delta"},
                   dict(BM=cfg["prep"]["BM"], BV=128, HEADWISE=headwise, GATE_FN=gate_fn, HAS_UNGATED=gate_fn == "silu"),
                   cfg["prep"])  # fmt: skip
        for name, kernel in (("dkdv", gs._bwd_dkdv_kernel), ("dq", gs._bwd_dq_kernel)):
            blocks = {k: v for k, v in cfg[name].items() if k in ("BM", "BN")}
            yield (f"gated_softmax bwd {name}", dtype, kernel, {"lse", "delta"},
                   dict(**blocks, BD=128, BV=128, CAUSAL=True, PRECISION=precision), cfg[name])  # fmt: skip
        state = {"gc", "h0", "h", "ht", "dht", "dh", "dh0", "dq", "dk"}
        common = dict(BT=64, PRECISION=precision)
        launch = gla._launch(_Cuda())
        yield (
            "gla fwd_h",
            dtype,
            gla._fwd_h_kernel,
            state,
            dict(**common, BK=64, BV=64, HAS_H0=True, STORE_HT=True),
            launch,
        )
        yield (
            "gla bwd_dh",
            dtype,
            gla._bwd_dh_kernel,
            state,
            dict(**common, BK=64, BV=64, HAS_DHT=True, STORE_DH0=True),
            launch,
        )
        yield ("gla fwd_o", dtype, gla._fwd_o_kernel, state, dict(**common, BC=16, BK=128, BV=64), launch)
        yield (
            "gla bwd_dqkv",
            dtype,
            gla._bwd_dqkv_kernel,
            state,
            dict(**common, BC=16, BK=128, BV=128),
            launch,
        )
    # Gated DeltaNet's recurrence runs on fp32 tensors whatever the input dtype; precision follows the input
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        every = POINTERS["_recurrence_bwd_kernel"] | POINTERS["_recurrence_fwd_kernel"]
        BK, BV, launch = gdn._blocks(128, 128, cuda=True)
        common = dict(L=64, BK=BK, BV=BV, PRECISION=precision)
        yield (f"gated_deltanet recurrence fwd ({dtype} inputs)", "fp32", gdn._recurrence_fwd_kernel, every,
               dict(**common, HAS_H0=True), launch)  # fmt: skip
        yield (f"gated_deltanet recurrence bwd ({dtype} inputs)", "fp32", gdn._recurrence_bwd_kernel, every,
               dict(**common, HAS_DHT=True), launch)  # fmt: skip


def resources(cubin: bytes) -> str:
    """Registers per thread and stack bytes per thread (register spills) from the bundled cuobjdump."""
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+)", text), re.search(r"STACK:(\d+)", text)
    return f"regs {regs.group(1) if regs else '?'}  stack (spills) {stack.group(1) if stack else '?'} B"


class _Cuda:
    """Stands in for a CUDA tensor where the modules pick their launch options."""

    is_cuda = True


def main() -> None:
    failures = 0
    for label, dtype, kernel, fp32, constexprs, launch in variants():
        start = time.time()
        warps, stages = launch.get("num_warps", 4), launch.get("num_stages", 3)
        try:
            compiled = compile_kernel(kernel, dtype, fp32, constexprs, warps, stages)
            info = f"{resources(compiled.asm['cubin'])}  smem {compiled.metadata.shared} B"
            print(
                f"ok    {label:40s} {dtype}  warps {warps}  {info}  ({time.time() - start:.1f} s)", flush=True
            )
        except Exception as error:
            failures += 1
            print(f"FAIL  {label:40s} {dtype}: {type(error).__name__}: {str(error)[:400]}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
