"""The Miras memories (moneta, yaad, memora) on CPU: forward+backward of the chunk path against the
token-by-token reference at T = 512 .. 2048, the chunk path's growth with T, and the gap between chunked and
recurrent outputs at the default chunk (gradients at the chunk start, by design). Prints tables and writes
benchmarks/results/bench_memory.json.

    python benchmarks/bench_memory.py --clock cpu --threads 1
    python benchmarks/bench_memory.py --quick        # T = 128 .. 512
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from gatelab import ops
from gatelab.benchmarking import print_table, time_side_by_side, write_results
from gatelab.testing import rel_rms

OPS = ("moneta", "yaad", "memora")


def make_inputs(op: str, T: int, B: int, H: int, K: int, V: int) -> dict[str, torch.Tensor]:
    """Leaf inputs as the layers make them: unit q/k, retention near 1, learning rate in (0, 1)."""
    gen = torch.Generator().manual_seed(0)
    x = {
        "q": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "k": F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1),
        "v": torch.randn(B, T, H, V, generator=gen),
        "g": F.logsigmoid(torch.randn(B, T, H, generator=gen) + 4),
        "eta": torch.sigmoid(torch.randn(B, T, H, generator=gen)),
    }
    if op == "yaad":
        x["delta"] = F.softplus(torch.randn(B, T, H, generator=gen)) + 1e-4
    return {name: t.requires_grad_() for name, t in x.items()}


def fwd_bwd(op: str, x: dict, backend: str):
    fn = getattr(ops, op)

    def run():
        o, _ = fn(**x, backend=backend)
        o.sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="T = 128, 256, 512")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--key-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, K = 1, args.heads, args.key_dim
    V = 2 * K  # the layers' expand_v = 2
    lengths = (128, 256, 512) if args.quick else (512, 1024, 2048)
    rows = []
    for op in OPS:
        row = {"op": op}
        for T in lengths:
            x = make_inputs(op, T, B, H, K, V)
            times = time_side_by_side(
                {"reference": fwd_bwd(op, x, "reference"), "chunk": fwd_bwd(op, x, "chunk")},
                repeats=args.repeats, warmup=1, clock=args.clock,
            )  # fmt: skip
            row[f"ref T={T} (s)"] = times["reference"]
            row[f"chunk T={T} (s)"] = times["chunk"]
        row["speedup at max T"] = row[f"ref T={lengths[-1]} (s)"] / row[f"chunk T={lengths[-1]} (s)"]
        row[f"chunk growth T x{lengths[-1] // lengths[0]}"] = (
            row[f"chunk T={lengths[-1]} (s)"] / row[f"chunk T={lengths[0]} (s)"]
        )
        with torch.no_grad():
            x = make_inputs(op, lengths[0], B, H, K, V)
            fn = getattr(ops, op)
            recurrent, chunked = fn(**x, backend="reference")[0], fn(**x, backend="chunk")[0]
        row[f"gap chunk 16 vs recurrent (rel RMS, T={lengths[0]})"] = rel_rms(chunked, recurrent)
        rows.append(row)
        print(row, flush=True)
    print_table(f"Miras memories, forward+backward, fp32, B={B} H={H} K={K} V={V}, median {args.clock} time",
                rows, list(rows[0]))  # fmt: skip
    meta = {"B": B, "H": H, "K": K, "V": V, "dtype": "float32", "clock": args.clock,
            "threads": torch.get_num_threads(), "lengths": list(lengths), "chunk_size": 16}  # fmt: skip
    print(f"wrote {write_results('bench_memory', rows, meta)}")


if __name__ == "__main__":
    main()
