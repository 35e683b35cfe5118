"""Linear-attention ops side by side on CPU: forward+backward of the chunk path against the token-by-token
reference, growth of the chunk path from T to 4T, peak memory against T, and the length where chunked GLA
overtakes causal softmax SDPA. Prints tables and writes benchmarks/results/bench_linear.json.

    python benchmarks/bench_linear.py                      # fp32, B=1, H=4, D=64; T=2048 vs 8192
    python benchmarks/bench_linear.py --quick              # T=256 vs 1024, short crossover sweep
    python benchmarks/bench_linear.py --clock cpu --threads 1   # process CPU time: steadier on a busy machine

gated_deltanet, lina and flow rows appear when gatelab.ops has them. Peak memory is the harness's
torch.profiler replay of the allocations and frees of one forward+backward call (tensor bytes, not RSS).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gatelab import ops
from gatelab.benchmarking import peak_memory_bytes, print_table, write_results
from gatelab.ops.lightning import alibi_slopes


def make_case(op: str, T: int, B: int, H: int, D: int):
    """A function running forward+backward of ``op`` once on fixed leaf inputs, for a given backend."""
    gen = torch.Generator().manual_seed(0)
    leaf = lambda *shape: torch.randn(*shape, generator=gen).requires_grad_()
    q, k, v = leaf(B, T, H, D), leaf(B, T, H, D), leaf(B, T, H, D)
    if op == "gla":
        g = (F.logsigmoid(torch.randn(B, T, H, D, generator=gen)) / 16).requires_grad_()
        call = lambda backend: ops.gla(q, k, v, g, backend=backend)
    elif op == "lightning":
        decay = (-alibi_slopes(H)).requires_grad_()
        call = lambda backend: ops.lightning(q, k, v, decay, backend=backend)
    elif op == "gated_deltanet":
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4).requires_grad_()
        beta = torch.rand(B, T, H, generator=gen).requires_grad_()
        kn = F.normalize(k.detach(), dim=-1).requires_grad_()
        call = lambda backend: ops.gated_deltanet(q, kn, v, g, beta, backend=backend)
    elif op == "lina":
        gate = (0.5 + torch.rand(B, T, H, generator=gen)).requires_grad_()
        call = lambda backend: ops.lina(q, k, v, key_gate=gate, value_gate=gate, backend=backend)
    elif op == "flow":
        call = lambda backend: ops.flow(q, k, v, backend=backend)
    elif op == "sdpa":
        call = lambda backend: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
    else:
        raise ValueError(f"unknown op {op!r}")

    def run(backend: str = "chunk"):
        out = call(backend)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return run


def timer(clock: str):
    return time.process_time if clock == "cpu" else time.perf_counter


def side_by_side(fns: dict, repeats: int, clock: str, warmup: tuple[str, ...] = ()) -> dict[str, float]:
    """Median seconds per call, interleaved rounds so machine noise hits every contender alike; only the
    names in ``warmup`` get a warm-up call (the slow references are not worth one)."""
    now = timer(clock)
    for name in warmup:
        fns[name]()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            samples[name].append(now() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="T=256 vs 1024, 3 repeats, short sweeps")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="rounds for the chunk paths and SDPA")
    parser.add_argument("--ref-repeats", type=int, default=3, help="rounds for the (slow) references")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, D = 1, args.heads, args.head_dim
    T1, T4 = (256, 1024) if args.quick else (2048, 8192)
    repeats = 3 if args.quick else args.repeats
    names = [n for n in ("gla", "lightning", "gated_deltanet", "lina", "flow") if hasattr(ops, n)]
    meta = {
        "B": B,
        "H": H,
        "D": D,
        "dtype": "float32",
        "clock": args.clock,
        "threads": torch.get_num_threads(),
    }

    # 1. chunk vs reference at T1, and chunk growth T1 -> T4 (targets: >= 20x, <= 4.6x)
    speed_rows = []
    for name in names:
        short, long = make_case(name, T1, B, H, D), make_case(name, T4, B, H, D)
        fast = side_by_side(
            {"chunk": short, "chunk_4T": long}, repeats, args.clock, warmup=("chunk", "chunk_4T")
        )
        slow = side_by_side({"reference": lambda s=short: s("reference")}, args.ref_repeats, args.clock)
        speed_rows.append(
            {
                "op": name,
                f"reference T={T1} (s)": slow["reference"],
                f"chunk T={T1} (s)": fast["chunk"],
                "speedup": slow["reference"] / fast["chunk"],
                f"chunk T={T4} (s)": fast["chunk_4T"],
                "growth x4 T": fast["chunk_4T"] / fast["chunk"],
            }
        )
        print(f"{name}: {speed_rows[-1]}", flush=True)
    print_table(
        f"forward+backward, fp32, B={B} H={H} D={D}, median {args.clock} time",
        speed_rows,
        list(speed_rows[0]),
    )

    # 2. peak memory of the chunk path's forward+backward against T (target: linear)
    lengths = [T1 // 4, T1 // 2, T1, T4] if args.quick else [1024, 2048, 4096, 8192]
    memory_rows = []
    for name in names:
        row = {"op": name}
        for T in lengths:
            row[f"T={T} (MiB)"] = peak_memory_bytes(make_case(name, T, B, H, D)) / 2**20
        row["bytes/token at max T"] = row[f"T={lengths[-1]} (MiB)"] * 2**20 / lengths[-1]
        memory_rows.append(row)
    print_table(
        "peak memory, chunk forward+backward (torch.profiler replay)", memory_rows, list(memory_rows[0])
    )

    # 3. crossover with causal softmax SDPA (forward+backward)
    sweep = [64, 128, 256, 512] if args.quick else [256, 512, 1024, 2048, 4096, 8192]
    cross_rows, crossover = [], None
    for T in sweep:
        times = side_by_side(
            {"gla chunk": make_case("gla", T, B, H, D), "sdpa causal": make_case("sdpa", T, B, H, D)},
            repeats,
            args.clock,
            warmup=("gla chunk", "sdpa causal"),
        )
        ratio = times["sdpa causal"] / times["gla chunk"]
        cross_rows.append(
            {
                "T": T,
                "gla chunk (s)": times["gla chunk"],
                "sdpa causal (s)": times["sdpa causal"],
                "sdpa/gla": ratio,
            }
        )
        print(cross_rows[-1], flush=True)
        if crossover is None and ratio > 1:
            crossover = T
        elif crossover is not None and ratio > 1:
            break  # faster at two lengths in a row: past the crossover
        elif crossover is not None:
            crossover = None  # a fluke: keep looking
    print_table("gla chunk vs causal SDPA, forward+backward", cross_rows, list(cross_rows[0]))
    print(f"crossover: gla chunk faster than SDPA from T = {crossover} (first measured length)")
    path = write_results(
        "bench_linear",
        speed_rows + memory_rows + cross_rows,
        {**meta, "T": [T1, T4], "memory_lengths": lengths, "crossover_T": crossover, "quick": args.quick},
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
