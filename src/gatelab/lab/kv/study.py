"""``gatelab cache`` as a library call: train a small softmax LM per task, then decode contexts longer than
its training window under each KV-cache policy and budget; write results.json, report.md and a
quality-vs-memory plot ("In-context KV-Cache Eviction for LLMs via Attention-Gate", Zeng et al., 2024, and
its baselines).

    >>> import gatelab.lab
    >>> results = gatelab.lab.cache(gatelab.lab.CacheStudy(tasks=("mqar",), quick=True), out="runs/cache-smoke")
"""

from __future__ import annotations

import dataclasses
import datetime
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gatelab.lab import rundir

TASKS = {  # (train options, eval options): text is evaluated at 4x its training window, mqar at 2x
    "text": ({"seq_len": 128, "max_bytes": 1_000_000}, {"seq_len": 512, "max_bytes": 1_000_000}),
    "mqar": (
        {"vocab_size": 72, "seq_len": 32, "num_kv_pairs": 4},
        {"vocab_size": 72, "seq_len": 64, "num_kv_pairs": 4},
    ),
}
# Base training and gate fine-tuning per task; eval sequences (batches, rows). MQAR at T=32 leaves the
# loss = ln(kv) plateau around step 500 with a constant lr 1e-3 (0.93 accuracy by step 800 here); at T=16
# with this vocabulary it stayed on the plateau for 800 steps.
TRAIN = {
    "text": {"steps": 300, "batch_size": 16, "lr": 3e-3, "gate_steps": 150, "eval": (2, 8)},
    "mqar": {"steps": 1000, "batch_size": 64, "lr": 1e-3, "min_lr_ratio": 1.0, "warmup": 30,
             "gate_steps": 150, "eval": (4, 16)},
}  # fmt: skip
# The gate reads the last 64 tokens (a constant-size gate state): on text (T=512) at 50% / 25% kept it
# scored like a whole-context gate, loss 1.96-2.02 / 2.05-2.12 (fine-tuning seeds 1-2) against 1.96-2.03 /
# 2.09-2.11 (seeds 0-2); one-off script on the dev CPU, 2026-11-30, hard flags evaluated in one parallel pass.
GATE_OPTIONS = {"window": 64}
RECENT_SHARE = 32  # --gate-recent default: blocks of eval length / 32 tokens (16 on text at T=512)


def gate_variants(fraction: float, eval_len: int, recent: int) -> list[tuple[str, dict]]:
    """(row label, finetune_gates options) of the gated rows at one budget: the paper's gate, and with
    ``recent`` > 0 the gate whose evicted tokens stay visible for their block and the next. The recent
    blocks hold ``recent`` to 2 * ``recent`` tokens (1.5 * ``recent`` on average), taken from the budget."""
    variants = [("attention_gate", {"target_keep": fraction, **GATE_OPTIONS})]
    if recent > 0:
        target = 1.0 if fraction == 1.0 else max(0.01, fraction - 1.5 * recent / eval_len)
        variants.append(
            (f"attention_gate+recent{recent}", {"target_keep": target, "recent": recent, **GATE_OPTIONS})
        )
    return variants


QUICK = {"steps": 4, "gate_steps": 2, "eval_len": 24, "eval_batches": 1, "eval_batch_size": 2}


@dataclass(frozen=True)
class CacheStudy:
    """What ``gatelab cache`` runs: tasks, policies, budgets (fractions of the cache kept, in (0, 1]; kept
    unique, largest first), the base LM's sizes and (per task by default) training and evaluation budget,
    seeds from ``seed`` on. ``gate_recent``: also the gate with recent blocks of this many tokens (None:
    eval length / RECENT_SHARE; 0: only the paper's gate); ``quick``: tiny sizes, a smoke run."""

    tasks: tuple[str, ...] = ("text", "mqar")
    policies: tuple[str, ...] = ("full", "streaming", "h2o", "attention_gate")
    budgets: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    steps: int | None = None
    gate_steps: int | None = None
    gate_recent: int | None = None
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    eval_batches: int | None = None
    eval_batch_size: int | None = None
    seed: int = 0
    seeds: int = 1
    threads: int = 1  # one-token decode steps are too small to split across cores
    quick: bool = False

    def __post_init__(self):
        from gatelab.cache import POLICIES

        for task in self.tasks:
            if task not in TASKS:
                raise ValueError(f"--tasks: unknown task {task!r}; gatelab cache runs {', '.join(TASKS)}")
        for policy in self.policies:
            if policy not in POLICIES:
                raise ValueError(f"--policies: unknown policy {policy!r}; known: {', '.join(POLICIES)}")
        budgets = sorted(set(self.budgets), reverse=True)
        if not budgets or any(not 0 < b <= 1 for b in budgets):
            raise ValueError(f"--budgets must be fractions in (0, 1], got {list(self.budgets)}")
        object.__setattr__(self, "budgets", tuple(budgets))
        names = ("steps", "gate_steps", "d_model", "n_layers", "n_heads", "eval_batches", "eval_batch_size",
                 "threads", "seeds")  # fmt: skip
        for name in names:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a positive int, got {value}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.gate_recent is not None and self.gate_recent < 0:
            raise ValueError(f"--gate-recent must be >= 0 (0: only the paper's gate), got {self.gate_recent}")

    def replace(self, **changes) -> CacheStudy:
        return dataclasses.replace(self, **changes)


def base_spec(name: str, study: CacheStudy, seed: int):
    """The RunSpec of the softmax LM trained on ``name`` before any policy decodes; returns it with the
    evaluation task's options and the task's budget (steps, gate_steps, batch_size, lr, eval, ...)."""
    from gatelab.lab.spec import RunSpec

    train_options, eval_options = (dict(o) for o in TASKS[name])
    budget = dict(TRAIN[name])
    if study.quick:
        budget.update(steps=QUICK["steps"], gate_steps=QUICK["gate_steps"])
        if name == "text":
            train_options["seq_len"], eval_options["seq_len"] = QUICK["eval_len"] // 2, QUICK["eval_len"]
        else:
            eval_options["seq_len"] = 2 * train_options["seq_len"]
    for key in ("steps", "gate_steps"):
        if getattr(study, key) is not None:
            budget[key] = getattr(study, key)
    spec = RunSpec(
        task=name, task_options=train_options, pattern="softmax", d_model=study.d_model,
        n_layers=study.n_layers, n_heads=study.n_heads, steps=budget["steps"], batch_size=budget["batch_size"],
        lr=budget["lr"], warmup=budget.get("warmup", max(1, budget["steps"] // 10)),
        min_lr_ratio=budget.get("min_lr_ratio", 0.1), eval_every=0, eval_batches=2, seed=seed,
    )  # fmt: skip
    return spec, eval_options, budget


def run_task(name: str, study: CacheStudy, seed: int, console) -> dict:
    """Train the base LM on ``name`` with ``seed`` and decode its evaluation sequences under every policy and
    budget of ``study``; returns the task's results entry."""
    from gatelab.lab.kv.evaluate import decode_eval, finetune_gates, finetune_lm
    from gatelab.lab.spec import build
    from gatelab.lab.tasks import make_task
    from gatelab.lab.train import train

    spec, eval_options, budget = base_spec(name, study, seed)
    train_task, eval_task = make_task(name, **spec.task_options), make_task(name, **eval_options)
    eval_len = eval_task.seq_len
    spec = spec.replace(max_seq_len=max(eval_len, train_task.seq_len))
    _, model, train_config = build(spec, train_task)
    trained = train(model, train_task, train_config)
    console.print(
        f"{name}: trained {budget['steps']} steps at T={train_task.seq_len} in {trained.wall_s:.0f} s, "
        f"val loss {trained.final.get('loss', float('nan')):.3f}"
    )
    n_batches, batch_size = budget.pop("eval")
    n_batches = QUICK["eval_batches"] if study.quick else study.eval_batches or n_batches
    batch_size = QUICK["eval_batch_size"] if study.quick else study.eval_batch_size or batch_size
    batches = eval_task.eval_batches(n_batches, batch_size, seed=seed)
    rows = []

    def record(policy: str, fraction: float, metrics: dict, **extra) -> None:
        rows.append({"policy": policy, "budget": fraction, **metrics, **extra})
        console.print(
            f"  {policy:>24} budget {fraction:.2f}: kept {metrics['kept_fraction']:.3f}, held "
            f"{metrics['held_fraction']:.3f}, loss "
            f"{metrics['loss']:.3f}, accuracy {metrics['accuracy']:.3f}, "
            f"{metrics['tokens_per_s']:,.0f} tok/s"
        )

    # The gated models are the base LM fine-tuned gate_steps more with their gates; the other policies run
    # on the base LM fine-tuned the same steps, batches and learning rate without gates (the control), so
    # that every policy sees an LM with the same number of updates.
    base_full = decode_eval(model, batches, "full")
    control, _ = finetune_lm(
        model, train_task, budget["gate_steps"], batch_size=budget["batch_size"], seed=seed
    )
    full = decode_eval(control, batches, "full")
    console.print(
        f"  base LM full cache: loss {base_full['loss']:.3f}, accuracy {base_full['accuracy']:.3f}; "
        f"after {budget['gate_steps']} control steps:"
    )
    record("full", 1.0, full)
    recent = eval_len // RECENT_SHARE if study.gate_recent is None else study.gate_recent
    for fraction in study.budgets:
        for policy in study.policies:
            if policy == "full":
                continue
            if policy == "attention_gate":
                for label, options in gate_variants(fraction, eval_len, recent):
                    tuned, history = finetune_gates(
                        model, train_task, steps=budget["gate_steps"], batch_size=budget["batch_size"],
                        seed=seed, **options,
                    )  # fmt: skip
                    metrics = decode_eval(tuned, batches, "attention_gate")
                    record(label, fraction, metrics, gate_steps=budget["gate_steps"], gate_options=options,
                           train_kept=history[-1]["kept"] if history else None)  # fmt: skip
            elif fraction == 1.0:
                record(policy, 1.0, full, note="budget >= sequence: identical to full (tested)")
            else:
                record(
                    policy, fraction, decode_eval(control, batches, policy, budget=fraction, seq_len=eval_len)
                )
    return {
        "train": train_task.describe(),
        "eval": eval_task.describe(),
        "model": model.config.to_dict(),
        "train_budget": budget,
        "base_train": {"wall_s": trained.wall_s, "final": trained.final},
        "base_full": {k: base_full[k] for k in ("loss", "accuracy")},
        "eval_batches": n_batches,
        "eval_batch_size": batch_size,
        "rows": rows,
    }


def aggregate_rows(per_seed: list[list[dict]]) -> list[dict]:
    """One row per (policy, budget), in first-seen order: numbers averaged over the seeds, with the
    standard deviation (n - 1) of loss and accuracy as ``loss_std`` / ``accuracy_std`` (0 for one seed),
    lists of numbers (bytes per layer) averaged element by element; anything else from the first seed."""
    from gatelab.lab.tables import mean_std

    groups: dict[tuple, list[dict]] = {}
    for rows in per_seed:
        for row in rows:
            groups.setdefault((row["policy"], row["budget"]), []).append(row)
    out = []
    for group in groups.values():
        row = dict(group[0])
        for key, value in group[0].items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "budget":
                row[key] = sum(r[key] for r in group) / len(group)
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                row[key] = [sum(column) / len(group) for column in zip(*(r[key] for r in group))]
        for key in ("loss", "accuracy"):
            row[f"{key}_std"] = mean_std([r[key] for r in group])["std"]
        row["seeds"] = len(group)
        out.append(row)
    return out


def run_seeds(name: str, study: CacheStudy, console) -> dict:
    """run_task for each seed; with several, the per-seed entries go under "runs" and "rows" aggregates."""
    seeds = list(range(study.seed, study.seed + study.seeds))
    entries = []
    for seed in seeds:
        if len(seeds) > 1:
            console.print(f"{name}: seed {seed}")
        entries.append(run_task(name, study, seed, console))
    entry = dict(entries[0])
    entry["seeds"] = seeds
    if len(seeds) > 1:
        entry["runs"] = entries
        entry["rows"] = aggregate_rows([e["rows"] for e in entries])
        entry["base_full"] = {
            k: sum(e["base_full"][k] for e in entries) / len(entries) for k in ("loss", "accuracy")
        }
    return entry


def cache(
    study: CacheStudy | None = None,
    out: str | Path | None = None,
    *,
    overwrite: bool = False,
    command_line: str = "",
    console=None,
) -> dict:
    """Run ``study`` (default: CacheStudy()) and write results.json, report.md and quality_vs_memory.png into
    ``out`` (default: runs/cache-<UTC time>); returns the results. The folder is locked while the study runs;
    one with an earlier study's results.json is refused unless ``overwrite``."""
    from rich.console import Console

    from gatelab.lab.comparison import environment
    from gatelab.lab.kv.study_report import markdown, plot
    from gatelab.lab.tables import to_json_safe

    study = CacheStudy() if study is None else study
    stamp = datetime.datetime.now(datetime.timezone.utc)
    run_dir = Path(out or f"runs/cache-{stamp:%Y%m%d-%H%M%S}")
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=160)  # piped output: one line per row
    with rundir.locked(run_dir):
        rundir.refuse_existing(run_dir, ("results.json",), overwrite=overwrite)
        torch.manual_seed(study.seed)
        torch.set_num_threads(study.threads)
        start = time.perf_counter()
        results = {
            "name": run_dir.name,
            "created": stamp.isoformat(timespec="seconds"),
            "command": command_line,
            "environment": environment("cpu"),
            "threads": study.threads,
            "policies": list(study.policies),
            "budgets": list(study.budgets),
            "tasks": {},
        }
        for task in study.tasks:
            results["tasks"][task] = run_seeds(task, study, console)
            results["wall_s"] = time.perf_counter() - start
            rundir.atomic_write_json(run_dir / "results.json", to_json_safe(results))
        results["wall_s"] = time.perf_counter() - start
        rundir.atomic_write_json(run_dir / "results.json", to_json_safe(results))
        plot(results, run_dir / "quality_vs_memory.png")
        rundir.atomic_write_text(run_dir / "report.md", markdown(results))
    console.print(f"wrote {run_dir / 'report.md'} ({results['wall_s']:.0f} s)")
    return results
