"""The Miras memories (moneta, yaad, memora) on CPU: forward+backward of the chunk path against the
token-by-token reference at T = 512 .. 2048, the chunk path's growth with T, and the gap between chunked and
recurrent outputs at the default chunk (gradients at the chunk start, by design); and affine_scaled's SDPA
path against its dense reference. Prints tables and writes benchmarks/results/bench_memory.json (or
bench_memory_affine.json for ``--part affine``).

    python benchmarks/bench_memory.py --clock cpu --threads 1
    python benchmarks/bench_memory.py --quick        # T = 128 .. 512
    python benchmarks/bench_memory.py --part affine  # only affine_scaled
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


def affine_rows(lengths, repeats: int, clock: str, H: int, D: int) -> list[dict]:
    """affine_scaled causal forward+backward: SDPA + running value sums against the dense reference."""
    rows = []
    for T in lengths:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, T, H, D, generator=gen).requires_grad_() for _ in range(3))
        alpha = torch.rand(1, T, H, generator=gen).requires_grad_()
        beta = (0.01 * torch.randn(1, T, H, generator=gen)).requires_grad_()

        def run(backend, x=(q, k, v, alpha, beta)):
            return lambda: ops.affine_scaled(*x, backend=backend).sum().backward()

        times = time_side_by_side({"reference": run("reference"), "sdpa": run("sdpa")}, repeats=repeats,
                                  warmup=1, clock=clock)  # fmt: skip
        row = {"T": T, "reference (s)": times["reference"], "sdpa (s)": times["sdpa"]}
        row["reference / sdpa"] = times["reference"] / times["sdpa"]
        rows.append(row)
        print(row, flush=True)
    return rows


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
    parser.add_argument("--part", choices=["all", "memory", "affine"], default="all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    B, H, K = 1, args.heads, args.key_dim
    V = 2 * K  # the layers' expand_v = 2
    lengths = (128, 256, 512) if args.quick else (512, 1024, 2048)
    meta = {"B": B, "H": H, "K": K, "V": V, "dtype": "float32", "clock": args.clock,
            "threads": torch.get_num_threads(), "lengths": list(lengths), "chunk_size": 16}  # fmt: skip
    if args.part in ("all", "affine"):
        affine = affine_rows(lengths, args.repeats, args.clock, H, 64)
        print_table(f"affine_scaled causal, forward+backward, fp32, B=1 H={H} D=64, median {args.clock} time",
                    affine, list(affine[0]))  # fmt: skip
        print(f"wrote {write_results('bench_memory_affine', affine, {**meta, 'D': 64})}")
    if args.part == "affine":
        return
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
    print(f"wrote {write_results('bench_memory', rows, meta)}")


if __name__ == "__main__":
    main()
