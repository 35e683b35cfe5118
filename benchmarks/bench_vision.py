"""Vision mixers side by side on CPU: forward+backward of each mixer on one (B, H, W, C) map with its fp32
reference backend and its fast path, on the same weights. Prints a table and writes
benchmarks/results/bench_vision.json.

    python benchmarks/bench_vision.py                         # 32 x 32 map, C=64, 4 heads, B=1
    python benchmarks/bench_vision.py --quick                 # 8 x 8, a smoke run
    python benchmarks/bench_vision.py --clock cpu --threads 1 # process CPU time: steadier on a busy machine

Activator and NiNformer have no separate fast math (their "torch" path is the same MLPs through nn
modules), so their two columns measure the modules against the explicit fp32 formula.
"""

from __future__ import annotations

import argparse

import torch

import gatelab
from gatelab.benchmarking import print_table, time_side_by_side, write_results

# key -> (fast backend, build options beyond d_model and n_heads)
MIXERS = {
    "dual_gated_linear": ("matmul", {}),
    "gated_swin_rmt": ("sdpa", {"window_size": 8, "shift_size": 4}),
    "contmix": ("gather", {"kernel_size": 7, "small_kernel": 5}),
    "ninformer": ("torch", {}),
    "activator": ("torch", {}),
}


def fwd_bwd(mixer, x: torch.Tensor, backend: str):
    def run():
        mixer.config.backend = backend
        mixer.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        y, _ = mixer(xi)
        y.square().mean().backward()

    return run


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="map height and width")
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument("--quick", action="store_true", help="an 8 x 8 map, 2 repeats")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size, repeats = (8, 2) if args.quick else (args.size, args.repeats)
    x = torch.randn(args.batch, size, size, args.channels, generator=torch.Generator().manual_seed(0))
    rows = []
    for key, (fast, options) in MIXERS.items():
        if key == "ninformer":
            options = {**options, "map_size": (size, size)}
        torch.manual_seed(0)
        mixer = gatelab.make_mixer(key, d_model=args.channels, n_heads=args.heads, **options)
        times = time_side_by_side(
            {"reference": fwd_bwd(mixer, x, "reference"), fast: fwd_bwd(mixer, x, fast)},
            repeats=repeats, warmup=1, clock=args.clock,
        )  # fmt: skip
        rows.append(
            {
                "mixer": key,
                "fast path": fast,
                "reference ms": times["reference"] * 1e3,
                "fast ms": times[fast] * 1e3,
                "speedup": times["reference"] / times[fast],
            }
        )
    meta = {"map": [size, size], "channels": args.channels, "heads": args.heads, "batch": args.batch,
            "clock": args.clock, "repeats": repeats, "pass": "forward+backward"}  # fmt: skip
    title = (
        f"vision mixers, {size}x{size} map, C={args.channels}, B={args.batch}, fwd+bwd ({args.clock} clock)"
    )
    print_table(title, rows, ["mixer", "fast path", "reference ms", "fast ms", "speedup"])
    print(write_results("bench_vision", rows, meta, args.out_dir))


if __name__ == "__main__":
    main()
