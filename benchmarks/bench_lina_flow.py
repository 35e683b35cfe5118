"""lina and flow ops side by side: forward+backward time of the chunk path against the token-by-token
recurrence, the dense fp32 reference and plain causal softmax SDPA, growth with T and peak memory.
Prints a table and writes benchmarks/results/bench_lina_flow.json.

    python benchmarks/bench_lina_flow.py            # CPU, fp32, B=1, H=4, D=64, T in 512, 2048, 8192
    python benchmarks/bench_lina_flow.py --quick    # T=256 only
    python benchmarks/bench_lina_flow.py --clock cpu --threads 1   # CPU time: steadier on a loaded machine
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gatelab.benchmarking import peak_memory_bytes, print_table, time_side_by_side, write_results
from gatelab.ops import flow, lina

SLOW_MAX_T = 2048  # the dense reference is T x T and the recurrence a Python loop: only up to here


def contenders(T: int, B: int, H: int, D: int, device: str):
    """name -> fn running forward+backward once, on fresh leaf inputs (B, T, H, D) fp32."""
    g = torch.Generator(device="cpu").manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=g).to(device).requires_grad_()
    q, k, v = make(B, T, H, D), make(B, T, H, D), make(B, T, H, D)
    gate = (0.5 + torch.rand(B, T, H, generator=g)).to(device).requires_grad_()

    def step(fn):
        def run():
            out = fn()
            out = out[0] if isinstance(out, tuple) else out
            out.sum().backward()

        return run

    fns = {
        "sdpa causal": step(
            lambda: F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
            )
        )
    }
    backends = ["chunk"] + (["reference", "recurrent"] if T <= SLOW_MAX_T else [])
    for backend in backends:
        fns[f"lina {backend}"] = step(
            lambda b=backend: lina(q, k, v, key_gate=gate, value_gate=gate, backend=b)
        )
        fns[f"flow {backend}"] = step(lambda b=backend: flow(q, k, v, backend=b))
    fns["lina chunk bidirectional"] = step(
        lambda: lina(q, k, v, key_gate=gate, value_gate=gate, causal=False)
    )
    fns["flow chunk bidirectional"] = step(lambda: flow(q, k, v, causal=False))
    return fns


def time_cpu(fns: dict, *, repeats: int, warmup: int) -> dict[str, float]:
    """Median process CPU seconds per call, interleaved: on a shared, loaded machine this leaves out the time
    the process waits for a core (with one thread there is no spinning to count either)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.process_time()
            fn()
            samples[name].append(time.process_time() - start)
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--slow-repeats", type=int, default=3, help="repeats of the token-by-token recurrence"
    )
    parser.add_argument(
        "--clock", default="wall", choices=["wall", "cpu"], help="wall (default) or process CPU time"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.repeats, args.slow_repeats = [256], 3, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and args.device != "cpu":
        parser.error("--clock cpu measures CPU runs only")
    timer = time_side_by_side if args.clock == "wall" else lambda fns, device, **kw: time_cpu(fns, **kw)
    rows = []
    for T in args.lengths:
        fns = contenders(T, args.batch, args.heads, args.head_dim, args.device)
        # The Python-loop recurrence takes seconds per call: fewer repeats for it, in its own interleaved round.
        slow = {n: f for n, f in fns.items() if n.endswith("recurrent")}
        fast = {n: f for n, f in fns.items() if n not in slow}
        times = timer(fast, repeats=args.repeats, warmup=1, device=args.device)
        if slow:
            times.update(timer(slow, repeats=args.slow_repeats, warmup=0, device=args.device))
        for name, seconds in times.items():
            row = {"name": name, "T": T, "fwdbwd_ms": seconds * 1e3}
            op = name.split()[0]
            if name.endswith("chunk"):
                row["peak_MiB"] = peak_memory_bytes(fns[name], args.device) / 2**20
            for slow in ("recurrent", "reference"):
                if f"{op} {slow}" in times and name == f"{op} chunk":
                    row[f"{slow}/chunk"] = times[f"{op} {slow}"] / seconds
            if name.endswith("chunk"):
                row["sdpa/chunk"] = times["sdpa causal"] / seconds
            rows.append(row)
    by = {(r["name"], r["T"]): r for r in rows}
    for r in rows:  # growth of time and memory with T against the first length
        first = by.get((r["name"], args.lengths[0]))
        if first is not None and r["T"] != args.lengths[0]:
            r[f"time x vs T={args.lengths[0]}"] = r["fwdbwd_ms"] / first["fwdbwd_ms"]
    columns = ["name", "T", "fwdbwd_ms", "recurrent/chunk", "reference/chunk", "sdpa/chunk", "peak_MiB"]
    columns.append(f"time x vs T={args.lengths[0]}")
    print_table(f"lina / flow: forward+backward (median {args.clock} time), fp32", rows, columns)
    meta = {
        "clock": args.clock,
        "threads": torch.get_num_threads(),
        "slow_repeats": args.slow_repeats,
        "batch": args.batch,
        "heads": args.heads,
        "head_dim": args.head_dim,
        "dtype": "float32",
        "repeats": args.repeats,
        "device": args.device,
    }
    name = "bench_lina_flow" if args.clock == "wall" else "bench_lina_flow_cpu_time"
    print(write_results(name, rows, meta))


if __name__ == "__main__":
    main()
