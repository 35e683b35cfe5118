"""The LM's MLP slot side by side: forward+backward CPU time of the dense SwiGLU and of the MoE MLP with each
router (sparse gather path and dense reference), at the LM's sizes. Prints a table and writes
benchmarks/results/bench_moe.json.

    python benchmarks/bench_moe.py --threads 1      # B=16, T=64, d=64 (the default preset's text runs)
"""

from __future__ import annotations

import argparse

import torch

from gatelab.benchmarking import print_table, time_side_by_side, write_results
from gatelab.gates.moe import router_keys
from gatelab.lab.models.lm import LM, LMConfig


def contenders(B: int, T: int, d: int) -> dict:
    """name -> fn running one MLP's forward+backward on fresh (B, T, d) inputs; the MoE aux loss included."""
    x = torch.randn(B, T, d, requires_grad=True)
    mlps = {"swiglu": LMConfig(d_model=d)}
    for key in router_keys():
        for path in ("sparse", "dense"):
            mlps[f"moe:{key} {path}"] = LMConfig(d_model=d, mlp=f"moe:{key}", mlp_options={"path": path})
    fns = {}
    for name, config in mlps.items():
        mlp = LM(config).blocks[0].mlp

        def run(mlp=mlp):
            y = mlp(x)
            loss = y.sum() + (mlp.last.aux_loss if hasattr(mlp, "last") else 0)
            loss.backward()

        fns[name] = run
    return fns


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, d = 16, 64, 64
    times = time_side_by_side(contenders(B, T, d), repeats=args.repeats, warmup=3, clock="cpu")
    base = times["swiglu"]
    rows = [{"mlp": name, "ms": 1e3 * s, "x swiglu": s / base} for name, s in times.items()]
    print_table(f"MLP forward+backward, B={B} T={T} d={d}, CPU time", rows, ["mlp", "ms", "x swiglu"])
    write_results("bench_moe", rows, {"B": B, "T": T, "d_model": d, "clock": "cpu", "threads": args.threads})


if __name__ == "__main__":
    main()
