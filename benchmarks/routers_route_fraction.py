"""Routed fraction and FLOPs per token per layer of every saved model of a ``gatelab compare`` run.

    python benchmarks/routers_route_fraction.py runs/<name>

Router mixers record their last routing (``last_fraction``) and count their FLOPs (``flops_per_token``);
the baselines are counted the same way: softmax as lychee with every head retrieving, Gated DeltaNet as
nats_l without its softmax branch. Two eval batches of 16 per model, mean ± std over seeds.
"""

import statistics
import sys
from pathlib import Path

import torch

from gatelab.lab.diagnostics.compute import mixer_flops_per_token
from gatelab.lab.inspect import task_of
from gatelab.lab.models.lm import LM


def flops(mixer, L: int) -> float:
    """A router's own count; Gated DeltaNet as nats_l counts its GDN branch (no short convolutions, 6 H K V
    for the delta rule: the lab's count, with them and 7 H K V, would not compare with nats_l's); any other
    mixer (softmax) by the lab's count."""
    if type(mixer).__name__ == "GatedDeltaNet":
        c = mixer.config
        d, H, K, V = c.d_model, c.n_heads, c.key_dim, c.value_dim
        return 2 * d * (2 * H * K + 2 * H * V + 2 * H) + 2 * H * V * d + 6 * H * K * V
    return mixer_flops_per_token(mixer, L)


def main(run: Path) -> None:
    rows: dict[tuple[str, str], list] = {}
    for model_dir in sorted((run / "models").iterdir()):
        model = LM.load(model_dir).eval()
        inputs, _ = task_of(model_dir, None, say=lambda _: None).eval_batches(2, 16, seed=1)[0]
        with torch.no_grad():
            model(inputs)
        mixers = [block.mixer for block in model.blocks]
        fractions = [float(m.last_fraction) for m in mixers if getattr(m, "last_fraction", None) is not None]
        variant, task, _seed = model_dir.name.split("__")
        fraction = sum(fractions) / len(fractions) if fractions else None
        rows.setdefault((variant, task), []).append(
            (fraction, statistics.mean(flops(m, inputs.shape[1]) for m in mixers))
        )
    for (variant, task), values in sorted(rows.items()):
        fractions = [f for f, _ in values if f is not None]
        shown = f"{statistics.mean(fractions):.3f} ± {statistics.pstdev(fractions):.3f}" if fractions else "-"
        print(f"{variant:28s} {task:5s} routed fraction {shown}  "
              f"flops/token/layer {statistics.mean(f for _, f in values):.0f}  (n={len(values)})")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
