"""Sparse attention speed: block density vs ideal density of each mask, and time vs dense-mask SDPA.

    python benchmarks/bench_sparse.py            # full cases
    python benchmarks/bench_sparse.py --quick    # small shapes, a smoke run

Writes benchmarks/results/bench_sparse.json and prints a table (medians of several repeats, every ratio
measured side by side in one run).

Extra cases: if ``benchmarks/_sparse_routed_cases.py`` exists, its ``cases(quick: bool) -> list[dict]`` is
called and each dict becomes a row. The format of one case:

    {
        "name": str,                     # row label, e.g. "biformer 2D 64x64 topk=4"
        "run": Callable[[], Tensor],     # the sparse forward, inputs already built and captured (no grad)
        "dense": Callable[[], Tensor] | None,   # the dense-mask SDPA forward it is timed against, or None
        "block_density": float | None,   # fraction of (q block, kv block) pairs visited
                                         #   (gatelab.ops.common.flex.block_density(block_mask))
        "ideal_density": float | None,   # fraction of (query, key) pairs the mask allows
                                         #   (gatelab.ops.common.flex.ideal_density(dense_bool_mask))
        "notes": str,                    # optional, e.g. "compiled flex, tile-major 8x16"
    }

Each ``run``/``dense`` is called once to warm up (compilation happens there and is not timed), then
timed; the row reports both medians and dense / sparse.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gatelab.benchmarking import time_side_by_side, write_results
from gatelab.ops.common.flex import block_density, ideal_density
from gatelab.ops.neighborhood import full_mask, normalize_args
from gatelab.ops.neighborhood.flex import choose_tile, neighborhood_block_mask, neighborhood_flex
from gatelab.ops.sliding_window.flex import sliding_window_block_mask, sliding_window_flex

ROUTED = Path(__file__).with_name("_sparse_routed_cases.py")


def _dense_sdpa(q, k, v, mask=None, causal=False):
    """(B, N, H, D) inputs, transposed once outside the timed call."""
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # (B, H, N, D)
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, is_causal=causal)


def neighborhood_cases(spatial, kernel, stride=1, dilation=1, causal=False, H=4, D=64, variants=()):
    """One row per flex variant (block size, token order) of one neighborhood problem, each against
    dense-mask SDPA on the same inputs."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, *spatial, H, D) for _ in range(3))
    ks, st, di, ca = normalize_args(tuple(spatial), kernel, stride, dilation, causal)
    mask = full_mask(tuple(spatial), ks, st, di, ca, 0, "cpu")  # (N, N)
    flat = [t.flatten(1, len(spatial)) for t in (q, k, v)]
    dense = _dense_sdpa(*flat, mask=mask)
    label = "x".join(map(str, spatial))
    opts = (
        f"k={kernel}" + (f" s={stride}" if stride != 1 else "") + (f" d={dilation}" if dilation != 1 else "")
    )
    opts += " causal" if causal else ""
    rows = []
    for block_size, tile_major in variants or [(128, None)]:
        tile = choose_tile(tuple(spatial), ks, st, di, ca, "cpu", block_size, tile_major)
        bm = neighborhood_block_mask(tuple(spatial), ks, st, di, ca, 0, "cpu", block_size, tile)
        order = "row-major" if tile is None else "tile-major " + "x".join(map(str, tile))
        auto = " (auto order)" if tile_major is None else ""

        def run(block_size=block_size, tile_major=tile_major):
            return neighborhood_flex(
                q, k, v, spatial=tuple(spatial), kernel_size=ks, stride=st, dilation=di, causal=ca,
                scale=D**-0.5, block_size=block_size, tile_major=tile_major, compile=True,
            )  # fmt: skip

        rows.append(
            {
                "name": f"neighborhood {len(spatial)}D {label} {opts}",
                "run": run,
                "dense": dense,
                "block_density": block_density(bm),
                "ideal_density": ideal_density(mask),
                "notes": f"compiled flex, block {block_size}, {order}{auto}",
                "flops_dense": 4 * H * mask.numel() * D,
            }
        )
    return rows


def sliding_window_cases(T, window, sinks, H=4, D=64):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, T, H, D) for _ in range(3))
    from gatelab.ops.common.masks import attention_mask

    mask = attention_mask(T, T, causal=True, window=window, sinks=sinks)
    bm = sliding_window_block_mask(T, T, window, sinks, "cpu")
    run = lambda: sliding_window_flex(q, k, v, window=window, sinks=sinks, scale=None, compile=True)
    common = {"run": run, "block_density": block_density(bm), "ideal_density": ideal_density(mask)}
    flops = 4 * H * T * T * D
    return [
        {
            **common,
            "name": f"sliding_window T={T} w={window} sinks={sinks}",
            "dense": _dense_sdpa(q, k, v, mask=mask),
            "notes": "compiled flex, block 128; dense = dense-mask SDPA",
            "flops_dense": flops,
        },
        {
            **common,
            "name": f"sliding_window T={T} w={window} sinks={sinks} vs causal",
            "dense": _dense_sdpa(q, k, v, causal=True),
            "notes": "compiled flex, block 128; dense = causal SDPA (is_causal)",
            "flops_dense": flops,
        },
    ]


def routed_cases(quick: bool) -> list[dict]:
    if not ROUTED.exists():
        return []
    spec = importlib.util.spec_from_file_location("_sparse_routed_cases", ROUTED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.cases(quick))


def measure(case: dict, repeats: int) -> dict:
    """Warm up (compile) once, then time sparse and dense side by side."""
    start = time.perf_counter()
    with torch.no_grad():
        case["run"]()
        warm_s = time.perf_counter() - start
        fns = {"sparse": case["run"]}
        if case.get("dense") is not None:
            fns["dense"] = case["dense"]
        times = time_side_by_side(fns, repeats=repeats, warmup=1)
    row = {
        "name": case["name"],
        "sparse_ms": 1e3 * times["sparse"],
        "dense_ms": 1e3 * times["dense"] if "dense" in times else None,
        "speedup": times["dense"] / times["sparse"] if "dense" in times else None,
        "block_density": case.get("block_density"),
        "ideal_density": case.get("ideal_density"),
        "first_call_s": warm_s,
        "notes": case.get("notes", ""),
    }
    if case.get("flops_dense"):
        row["gflop_dense"] = case["flops_dense"] / 1e9
        if row["block_density"] is not None:
            row["gflop_visited"] = row["gflop_dense"] * row["block_density"]
    return row


def gpu_cases(
    device: str = "cuda", T: int = 32768, window: int = 2048, H: int = 16, D: int = 128
) -> list[dict]:
    """On a GPU: sliding window 2048 at T=32768 against causal SDPA, forward and forward+backward,
    B=1, H=16, D=128, bf16 (the shapes of the H200 anchors)."""
    rows = []
    q, k, v = (torch.randn(1, T, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
    bm = sliding_window_block_mask(T, T, window, 0, device)
    rows.append(
        {
            "name": f"[gpu] sliding_window T={T} w={window} fwd",
            "run": lambda: sliding_window_flex(q, k, v, window=window, sinks=0, scale=None, compile=True),
            "dense": _dense_sdpa(q, k, v, causal=True),
            "block_density": block_density(bm),
            "ideal_density": None,
            "notes": "compiled flex vs causal SDPA (FlashAttention), bf16",
        }
    )
    # forward + backward: leaf copies that need grad, one random cotangent, grads cleared by set_to_none
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    cotangent = torch.randn_like(q)

    def backward_of(forward):
        def run():
            with torch.enable_grad():
                forward().backward(cotangent)
            for t in leaves:
                t.grad = None

        return run

    ql, kl, vl = leaves
    flex_fwd = lambda: sliding_window_flex(ql, kl, vl, window=window, sinks=0, scale=None, compile=True)
    sdpa_fwd = lambda: F.scaled_dot_product_attention(
        ql.transpose(1, 2), kl.transpose(1, 2), vl.transpose(1, 2), is_causal=True
    ).transpose(1, 2)
    rows.append(
        {
            "name": f"[gpu] sliding_window T={T} w={window} fwd+bwd",
            "run": backward_of(flex_fwd),
            "dense": backward_of(sdpa_fwd),
            "block_density": block_density(bm),
            "ideal_density": None,
            "notes": "compiled flex vs causal SDPA (FlashAttention), bf16, forward + backward",
        }
    )
    return rows


def print_rows(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="bench_sparse: sparse (flex) vs dense SDPA, median ms; speedup = dense / sparse")
    columns = ["name", "notes", "sparse_ms", "dense_ms", "speedup", "block_density", "ideal_density"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("name", "notes") else "right")
    for row in rows:
        cells = [row.get(c) for c in columns]
        table.add_row(*("-" if c is None else f"{c:.3g}" if isinstance(c, float) else str(c) for c in cells))
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--no-routed", action="store_true", help="skip benchmarks/_sparse_routed_cases.py")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)

    cases: list[dict] = []
    if args.quick:
        cases += neighborhood_cases((32, 32), 7, variants=[(128, None)])
        cases += sliding_window_cases(1024, 128, 4)
    else:
        # the target: 2D neighborhood, kernel 7, 64x64, H=4, D=64; block sizes and token orders compared
        cases += neighborhood_cases((64, 64), 7, variants=[(128, None), (128, True), (64, True), (64, False)])
        cases += neighborhood_cases((64, 64), 8, stride=8, variants=[(64, True), (128, False)])  # blocked
        cases += neighborhood_cases((96, 96), 13, variants=[(128, None), (128, True)])
        cases += neighborhood_cases((16, 16, 16), 5, variants=[(64, None), (64, True)])
        cases += neighborhood_cases((4096,), 255, causal=True)
        cases += sliding_window_cases(4096, 512, 4)
    if not args.no_routed:
        cases += routed_cases(args.quick)
    if torch.cuda.is_available():
        cases += gpu_cases()

    rows = []
    for case in cases:
        rows.append(measure(case, repeats))
        r = rows[-1]
        speed = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        print(f"{r['name']} [{r['notes']}]: {r['sparse_ms']:.1f} ms, {speed}", flush=True)
    print_rows(rows)
    path = write_results("bench_sparse", rows, meta={"quick": args.quick, "repeats": repeats})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
