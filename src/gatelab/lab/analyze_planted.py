"""Validation of gatelab.analysis on planted truth: a gatelab LM trained on MQAR whose retrieval circuit is
found by ablation and patching (ablating it drops accuracy to chance, ablating the other heads does not),
and a hand-built model with a planted gate head that interchange finds while its DLA is exactly zero."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gatelab.analysis import (
    ablate,
    ablation_scores,
    activation_patching,
    direct_logit_attribution,
    find_gate_heads,
)
from gatelab.lab.analyze import _accuracy, _target_logprob
from gatelab.lab.models.lm import LM, LMConfig

MQAR = {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4}  # README's MQAR validation size


def planted_gate_model() -> LM:
    """2 layers, d=16, vocab 8 embedded one-hot (tied unembedding rows e_0..e_7), every weight zero but:
    head (0, 0) writes "token 0 was seen" into channel 8, which no unembedding row reads (DLA exactly 0);
    the layer-1 MLP reads channel 8 and writes e_1 - e_2 (the gate's effect); head (0, 1) writes e_1 - e_2
    directly (a direct head: large DLA). Queries and keys are 0, so attention is uniform over the prefix."""
    lm = LM(LMConfig(vocab_size=8, d_model=16, n_layers=2, n_heads=2, seed=0)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.zero_()
        for norm in (lm.norm, *(m for b in lm.blocks for m in (b.mixer_norm, b.mlp_norm))):
            norm.weight.fill_(1.0)
        lm.embed.weight[torch.arange(8), torch.arange(8)] = 1.0
        mixer = lm.blocks[0].mixer
        mixer.v_proj.weight[0, 0] = 1.0  # head 0, value channel 0 <- token-0 indicator
        mixer.v_proj.weight[8, 0] = 1.0  # head 1, value channel 0 <- the same
        mixer.o_proj.weight[8, 0] = 3.0  # head 0 -> channel 8 (the gate signal)
        mixer.o_proj.weight[1, 8], mixer.o_proj.weight[2, 8] = 6.0, -6.0  # head 1 -> e_1 - e_2
        mlp = lm.blocks[1].mlp
        hidden = mlp.down.weight.shape[1]
        mlp.gate_up.weight[0, 8] = 1.0  # the gate half of unit 0 reads channel 8
        mlp.gate_up.weight[hidden, 8] = 1.0  # its up half too
        mlp.down.weight[1, 0], mlp.down.weight[2, 0] = 2.0, -2.0
    return lm


GATE_CLEAN = torch.tensor([[0, 3, 4, 5, 6, 7], [4, 0, 3, 5, 7, 6]])  # token 0 present
GATE_CORRUPT = torch.tensor([[3, 3, 4, 5, 6, 7], [4, 5, 3, 5, 7, 6]])  # token 0 absent


def planted_gate() -> dict:
    """Interchange effect and DLA of every head of :func:`planted_gate_model` on logit[1] - logit[2]."""
    lm = planted_gate_model()

    def metric(out):
        return (out[0][:, -1, 1] - out[0][:, -1, 2]).mean()

    patched = activation_patching(lm, lambda: lm(GATE_CLEAN), lambda: lm(GATE_CORRUPT), metric, per="head")
    effect = patched["patched"] - patched["corrupt"]
    dla = direct_logit_attribution(lm, GATE_CLEAN, 1, 2)
    heads_dla, total = dla["heads"].mean(0), float(dla["total"].mean())
    return {
        "effect": effect,
        "dla": heads_dla,
        "total": total,
        "found": find_gate_heads(effect, heads_dla, total),
    }


def train_mqar(
    out_dir: str | Path | None = None, steps: int = 1000, seed: int = 0, overwrite: bool = False
) -> LM:
    """README's MQAR validation model (2 layers, d=64, 4 heads, softmax; V=64, T=32, 4 pairs)."""
    from gatelab.lab.tasks import make_task
    from gatelab.lab.train import TrainConfig, train

    model = LM(LMConfig(vocab_size=64, d_model=64, n_layers=2, n_heads=4, max_seq_len=32, seed=seed))
    config = TrainConfig(
        steps=steps,
        batch_size=64,
        lr=1e-3,
        warmup=100,
        eval_every=0,
        seed=seed,
        out_dir=None if out_dir is None else str(out_dir),
        overwrite=overwrite,
        progress=False,
    )
    train(model, make_task("mqar", **MQAR), config)
    return model.eval()


def mqar_circuit(model: LM, batches: int = 4, batch_size: int = 32, seed: int = 0) -> dict:
    """Find the MQAR circuit by zero ablation and interchange, then ablate it and its complement.

    A head is in the circuit when ablating it alone costs >= 10% of the accuracy above chance, or when
    patching it alone from the clean run into a run on other prompts restores >= 20% of the clean
    target log-probability (heads that share the retrieval, each of which the others can cover, show here).
    Chance is 1 / (number of value tokens) = 2 / vocab_size."""
    from gatelab.lab.tasks import make_task

    task = make_task("mqar", **MQAR)
    data, other = (
        task.eval_batches(batches, batch_size, seed=seed),
        task.eval_batches(batches, batch_size, seed + 1),
    )
    inputs, targets = torch.cat([b[0] for b in data]), torch.cat([b[1] for b in data])
    corrupt = torch.cat([b[0] for b in other])
    run = lambda: model(inputs)  # noqa: E731
    accuracy = _accuracy(targets)
    chance = 2 / MQAR["vocab_size"]
    start = time.perf_counter()
    ablation = ablation_scores(model, run, accuracy)
    patched = activation_patching(model, run, lambda: model(corrupt), _target_logprob(targets), per="head")
    base = ablation["clean"]
    in_circuit = (-ablation["scores"] >= 0.1 * (base - chance)) | (patched["normalized"] >= 0.2)
    circuit = [(i, h) for i, h in in_circuit.nonzero().tolist()]
    others = [(i, h) for i, h in (~in_circuit).nonzero().tolist()]

    def accuracy_without(heads):
        by_layer: dict[int, list[int]] = {}
        for i, h in heads:
            by_layer.setdefault(i, []).append(h)
        return float(accuracy(ablate(model, run, by_layer))) if heads else base

    return {
        "base": base,
        "chance": chance,
        "ablation": ablation["scores"],
        "interchange": patched["normalized"],
        "circuit": circuit,
        "others": others,
        "without_circuit": accuracy_without(circuit),
        "without_others": accuracy_without(others),
        "seconds": time.perf_counter() - start,
    }


def plot_validation(mqar: dict, gate: dict, path: str | Path) -> Path:
    """The README figure: MQAR per-head ablation and interchange, the planted gate head's effect and DLA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    panels = [
        (mqar["ablation"], "MQAR: zero ablation, accuracy change"),
        (mqar["interchange"], "MQAR: interchange, normalised"),
        (gate["effect"], "planted gate: interchange effect"),
        (gate["dla"], "planted gate: DLA"),
    ]
    for ax, (values, title) in zip(axes, panels):
        bound = float(values.abs().max()) or 1.0
        shown = ax.imshow(values.numpy(), cmap="coolwarm", vmin=-bound, vmax=bound, aspect="auto")
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("head", fontsize=7)
        ax.set_ylabel("layer", fontsize=7)
        ax.set_xticks(range(values.shape[1]))
        ax.set_yticks(range(values.shape[0]))
        for (i, h), v in zip(
            torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])),
            values.flatten(),
        ):
            ax.text(int(h), int(i), f"{float(v):+.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(shown, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


__all__ = ["planted_gate_model", "planted_gate", "train_mqar", "mqar_circuit", "plot_validation"]


def validate(out: Path, steps: int = 1000, overwrite: bool = False, say=print) -> dict:
    """The planted-truth validation: train the MQAR model into ``out/mqar`` (the trainer refuses an earlier
    run there unless ``overwrite``), find and ablate its circuit, run the planted gate head, and write
    ``out/validation.json`` and ``out/validation.png``."""
    from gatelab.lab.rundir import atomic_write_json, locked, refuse_existing
    from gatelab.lab.tables import to_json_safe

    from .analyze import tensors_to_lists

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        refuse_existing(out, ("validation.json", "validation.png"), overwrite=overwrite)
        start = time.perf_counter()
        model = train_mqar(out / "mqar", steps=steps, overwrite=overwrite)
        trained = time.perf_counter() - start
        mqar, gate = mqar_circuit(model), planted_gate()
        plot_validation(mqar, gate, out / "validation.png")
        result = {"mqar": mqar, "gate": gate, "train_seconds": trained}
        atomic_write_json(out / "validation.json", to_json_safe(tensors_to_lists(result)))
    say(
        f"MQAR: accuracy {mqar['base']:.4f}; circuit {mqar['circuit']} ablated -> "
        f"{mqar['without_circuit']:.4f} (chance {mqar['chance']:.4f}); the other heads {mqar['others']} "
        f"ablated -> {mqar['without_others']:.4f}"
    )
    say(f"planted gate: found {[(g['layer'], g['head']) for g in gate['found']]}; trained in {trained:.0f} s")
    return result
