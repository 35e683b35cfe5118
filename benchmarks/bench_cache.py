"""KV-cache policies side by side: time to decode a sequence token by token through a small softmax LM
under each policy and budget, and the bytes the caches hold at the end, as ratios to the full cache.
Prints a table and writes benchmarks/results/bench_cache.json.

    python benchmarks/bench_cache.py             # d_model 64, 2 layers, B=4, T=512, budgets 0.5, 0.25, 0.1
    python benchmarks/bench_cache.py --quick     # T=64
"""

from __future__ import annotations

import argparse

import torch

from gatelab.benchmarking import print_table, time_side_by_side, write_results
from gatelab.cache import apply_policy, cache_bytes, remove_policy
from gatelab.lab.models.lm import LM, LMConfig


def decode(model, idx) -> list:
    states = None
    with torch.no_grad():
        for t in range(idx.shape[1]):
            _, states = model(idx[:, t : t + 1], states)
    return states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    T = 64 if args.quick else args.T
    model = LM(LMConfig(d_model=64, n_layers=2, n_heads=4, max_seq_len=T, seed=0)).eval()
    idx = torch.randint(0, 256, (args.batch, T), generator=torch.Generator().manual_seed(0))
    cases = [("full", 1.0, {})]
    for budget in (0.5, 0.25, 0.1):
        cases += [("streaming", budget, {"budget": budget, "seq_len": T})]
        cases += [("h2o", budget, {"budget": budget, "seq_len": T})]
    # untrained gates with init_keep 0.5 keep about half the tokens (logits = small noise around 0): their
    # rows time the gate's own work (its attention, the per-row gathers), not a trained keep rate
    cases += [("attention_gate", "~0.5", {"init_keep": 0.5, "window": 64})]
    cases += [("attention_gate", "~0.5 recent16", {"init_keep": 0.5, "window": 64, "recent": 16})]

    def runner(name, options):
        def run():
            apply_policy(model, name, **options)
            try:
                return decode(model, idx)
            finally:
                remove_policy(model)

        return run

    fns = {f"{name} {budget}": runner(name, options) for name, budget, options in cases}
    seconds = time_side_by_side(fns, repeats=args.repeats, warmup=1)
    rows = []
    full_bytes = sum(layer["held"] for layer in cache_bytes(fns["full 1.0"]()))
    for label, fn in fns.items():
        held = sum(layer["held"] + layer["gate"] for layer in cache_bytes(fn()))  # the gate's state too
        rows.append(
            {
                "name": label,
                "decode tok/s": args.batch * T / seconds[label],
                "time vs full": seconds[label] / seconds["full 1.0"],
                "cache bytes": held,
                "bytes vs full": held / full_bytes,
            }
        )
    print_table(
        f"decode B={args.batch}, T={T} (untrained gates keep about half; cache bytes include the gate's state)",
        rows,
        list(rows[0]),
    )
    path = write_results("bench_cache", rows, {"T": T, "batch": args.batch, "repeats": args.repeats})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
