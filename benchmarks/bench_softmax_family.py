"""Softmax-family mixers side by side: forward and forward+backward time and peak memory against plain
softmax attention, over T. Prints a table and writes benchmarks/results/bench_softmax_family.json.

    python benchmarks/bench_softmax_family.py            # CPU, fp32, B=1, H=4, D=64, T in 512..4096
    python benchmarks/bench_softmax_family.py --quick    # T=256 only
    python benchmarks/bench_softmax_family.py --device cuda --dtype bfloat16 --heads 16 --head-dim 128
"""

from __future__ import annotations

import argparse

import torch

import gatelab
from gatelab.benchmarking import peak_memory_bytes, print_table, time_side_by_side, write_results

MIXERS = {
    "softmax": {},
    "gated_softmax": {},  # G1 elementwise sigmoid (the paper's default)
    "gated_softmax_headwise": {"gate": "headwise"},
    "gated_softmax_fused": {"fused": "per_head"},
    "gated_heads": {},
    "clipped_softmax": {},
}


def build(name: str, d_model: int, heads: int, device: str, dtype: torch.dtype):
    key = name.split("_headwise")[0].split("_fused")[0]
    mixer = gatelab.make_mixer(key, d_model=d_model, n_heads=heads, **MIXERS[name])
    return mixer.to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats = [256], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    d_model = args.heads * args.head_dim
    torch.manual_seed(0)
    mixers = {name: build(name, d_model, args.heads, args.device, dtype) for name in MIXERS}
    rows = []
    for T in args.lengths:
        x = torch.randn(args.batch, T, d_model, device=args.device, dtype=dtype)
        xg = x.clone().requires_grad_(True)

        def forward(m, x=x):
            def run():
                with torch.no_grad():
                    m(x)

            return run

        def forward_backward(m, xg=xg):
            def run():
                y, _ = m(xg)
                y.sum().backward()

            return run

        timing = {"repeats": args.repeats, "device": args.device, "clock": args.clock}
        fwd = time_side_by_side({n: forward(m) for n, m in mixers.items()}, **timing)
        fb = time_side_by_side({n: forward_backward(m) for n, m in mixers.items()}, **timing)
        for name, mixer in mixers.items():
            rows.append(
                {
                    "mixer": name,
                    "T": T,
                    "fwd_ms": fwd[name] * 1e3,
                    "fwdbwd_ms": fb[name] * 1e3,
                    "fwd_vs_softmax": fwd[name] / fwd["softmax"],
                    "fwdbwd_vs_softmax": fb[name] / fb["softmax"],
                    "peak_MiB": peak_memory_bytes(forward_backward(mixer), args.device) / 2**20,
                }
            )
    columns = ["mixer", "T", "fwd_ms", "fwdbwd_ms", "fwd_vs_softmax", "fwdbwd_vs_softmax", "peak_MiB"]
    title = f"softmax family, {args.device} {args.dtype}, B={args.batch}, H={args.heads}, D={args.head_dim}"
    print_table(title, rows, columns)
    path = write_results("bench_softmax_family", rows, meta=vars(args))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
