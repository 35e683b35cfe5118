"""Presets of ``gatelab compare``: how much each comparison trains, on which tasks and model sizes.

Every mixer of a comparison gets the same budget (steps, batch, sizes, seeds), so a preset bounds the
work: ``quick`` is a smoke test, ``default`` a first look at every mixer, ``reproduce`` the run sized for
the papers' directional effects over 3 seeds, ``vision`` the feature-map gates and vision mixers on the
digits over 3 seeds. Every preset knows the digits tasks (``--tasks digits``), at their default options.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    tasks: tuple[str, ...]
    task_options: dict[str, dict]  # task name -> make_task options
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    steps: int = 200  # training steps of every run (per task: see task_overrides)
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine decays to lr * min_lr_ratio; 1.0 keeps lr constant after warmup
    warmup: int = 20
    eval_every: int = 50
    eval_batches: int = 4
    eval_batch_size: int = 32
    diag_batches: int = 2  # validation batches the diagnostics (and the W8A8 loss) are measured on
    diag_batch_size: int = 16
    seeds: int = 1
    # mixer keys or variants ("gated_softmax[gate=headwise]"); None: softmax, gated_softmax, clipped_softmax
    # and every other causal mechanism
    mixers: tuple[str, ...] | None = None
    mixer_options: dict = field(default_factory=dict)  # LMConfig.mixer_options
    # task name -> fields of this preset that differ on that task (sizes, steps, or its own "mixers"):
    # every mixer run on a task still gets that task's one budget
    task_overrides: dict[str, dict] = field(default_factory=dict)
    # the Zoology protocol: every run is trained at each of these learning rates and the table reports the
    # best per mixer (and the spread); empty: at ``lr`` only
    lrs: tuple[float, ...] = ()
    early_stop: float | None = None  # stop a run when its validation accuracy reaches this (Zoology: 0.99)
    # with early_stop: a mixer that solves at one learning rate skips the later ones of ``lrs`` (they could
    # not do better than solved; saves CPU). False (Zoology): every learning rate runs
    lrs_until_solved: bool = False
    workers: int = 1  # processes gatelab compare splits the runs over (one CPU thread each); --workers wins
    # task name -> points of a sweep: each point is a setting of its own (its own table row group, e.g. MQAR
    # at one (seq_len, num_kv_pairs) and d_model), given as preset fields ("d_model", "steps", ...) and
    # "task_options" laid over the task's
    grid: dict[str, tuple[dict, ...]] = field(default_factory=dict)

    def __post_init__(self):
        for name in (
            "d_model", "n_layers", "n_heads", "steps", "batch_size", "eval_every", "eval_batches",
            "eval_batch_size", "diag_batches", "diag_batch_size", "seeds", "workers",
        ):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"preset {self.name!r}: {name} must be a positive int, got {value!r}")
        if self.warmup < 0 or self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"preset {self.name!r}: need warmup >= 0, lr > 0 and min_lr_ratio in [0, 1], "
                f"got {self.warmup}, {self.lr}, {self.min_lr_ratio}"
            )
        missing = set(self.tasks) - set(self.task_options)
        if missing:
            raise ValueError(f"preset {self.name!r}: no task_options for {sorted(missing)}")
        names = {f.name for f in dataclasses.fields(self)} - {
            "name",
            "tasks",
            "task_options",
            "task_overrides",
        }
        for task, changes in self.task_overrides.items():
            unknown = set(changes) - names
            if unknown:
                raise ValueError(
                    f"preset {self.name!r}: task_overrides[{task!r}] has unknown fields {sorted(unknown)}"
                )
        for task, points in self.grid.items():
            for point in points:
                unknown = set(point) - names - {"task_options"} | (set(point) & {"grid", "lrs", "mixers"})
                if unknown or not isinstance(point.get("task_options", {}), dict):
                    raise ValueError(f"preset {self.name!r}: grid[{task!r}] point {point} has unknown fields "
                                     f"{sorted(unknown)} (task_options must be a dict)")  # fmt: skip
        check_lrs(self.lrs, f"preset {self.name!r}: lrs")
        if self.early_stop is not None and not 0 < self.early_stop <= 1:
            raise ValueError(
                f"preset {self.name!r}: early_stop must be in (0, 1] or None, got {self.early_stop}"
            )

    def for_task(self, task: str) -> Preset:
        """This preset with the task's overrides applied (the budget every mixer gets on that task)."""
        changes = self.task_overrides.get(task, {})
        return dataclasses.replace(self, **changes, task_overrides={}) if changes else self

    def replace(self, **changes) -> Preset:
        return dataclasses.replace(self, **changes)

    @property
    def learning_rates(self) -> tuple[float, ...]:
        """The learning rates every run is trained at: ``lrs``, or ``(lr,)``."""
        return tuple(self.lrs) or (self.lr,)

    def settings(self, task: str, task_options: dict | None = None) -> list[Setting]:
        """The settings ``task`` runs in: one (named as the task) with the task's budget, or one per point of
        its ``grid``. ``task_options`` replace the preset's (e.g. with a corpus) under every point's."""
        budget = self.for_task(task)
        options = dict(self.task_options[task] if task_options is None else task_options)
        if task not in self.grid:
            return [Setting(task, task, budget, options, {})]
        out = []
        for point in self.grid[task]:
            point = dict(point)
            point_options = point.pop("task_options", {})
            # the point's axes name it (the task's options and the model's sizes); what follows from them,
            # such as a batch size per sequence length, does not
            shown = {**point_options, **{k: v for k, v in point.items() if k in AXES}}
            label = f"{task}(" + ",".join(f"{SHORT.get(k, k)}={v}" for k, v in shown.items()) + ")"
            out.append(Setting(label, task, budget.replace(**point), {**options, **point_options}, shown))
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def run_spec(
        self,
        task: str,
        variant,
        seed: int = 0,
        device: str = "cpu",
        task_options: dict | None = None,
        lr: float | None = None,
    ):
        """The RunSpec of ``variant`` (a spec.Variant) on ``task`` with this preset's budget for that task
        (a :class:`Setting`'s budget is a preset too) at learning rate ``lr`` (None: the preset's);
        ``task_options`` replace the preset's (e.g. with a corpus). The preset's mixer options for other
        mechanisms stay out of the run."""
        from gatelab.lab.spec import RunSpec

        budget = self.for_task(task)
        if lr is not None:
            budget = budget.replace(lr=lr)
        base = {k: v for k, v in budget.mixer_options.items() if k in ("*", variant.key)}
        # the budget's fields of the same names: sizes, steps, lr schedule, evaluation and diagnostics batches
        shared = {
            f.name: getattr(budget, f.name) for f in dataclasses.fields(RunSpec) if hasattr(budget, f.name)
        }
        run = {
            "task": task,
            "task_options": dict(self.task_options[task] if task_options is None else task_options),
            "pattern": variant.key,
            "name": variant.name,
            "mixer_options": variant.mixer_options(base),
            "mlp": variant.mlp,
            "mlp_options": dict(variant.mlp_options),
            "positions": variant.positions,
            "norm": variant.norm,
            "warmup": min(budget.warmup, budget.steps - 1),
            "seed": seed,
            "device": device,
        }
        return RunSpec(**{**shared, **run})


SHORT = {"seq_len": "T", "num_kv_pairs": "kv", "d_model": "d"}  # how a grid point's fields name a setting
AXES = ("d_model", "n_layers", "n_heads")  # the preset fields that name a grid point (with its task options)


@dataclass(frozen=True)
class Setting:
    """Where a comparison's runs of one task train: ``label`` names its table (the task itself, or a grid
    point such as ``mqar(T=64,kv=8,d=64)``), ``budget`` is the preset for it, ``point`` what the grid
    changed."""

    label: str
    task: str
    budget: Preset
    task_options: dict
    point: dict


def check_lrs(lrs, what: str = "lrs") -> tuple[float, ...]:
    """``lrs`` as a tuple of distinct positive finite floats (an empty tuple is allowed)."""
    import math

    if not isinstance(lrs, tuple | list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in lrs
    ):
        raise ValueError(f"{what} must be a list of positive learning rates, got {lrs!r}")
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"{what} lists a learning rate twice: {list(lrs)}")
    return tuple(float(v) for v in lrs)


# the digits tasks at their defaults (a fixed 80 / 20 split of the 1797 images; segmentation at 16 x 16)
VISION_OPTIONS: dict[str, dict] = {"digits": {}, "digits_seg": {}}
# vision mixers whose defaults do not fit an 8 x 8 or 16 x 16 map
VISION_MIXER_OPTIONS: dict[str, dict] = {"biformer": {"regions": 2, "topk": 2, "lce_kernel": 3}}

PRESETS: dict[str, Preset] = {
    "quick": Preset(
        name="quick",
        description="smoke test: every mixer runs through training, evaluation, diagnostics and the report",
        tasks=("mqar", "text", "idle"),
        task_options={
            "mqar": {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 4},
            "text": {"seq_len": 32, "max_bytes": 200_000},
            "idle": {"vocab_size": 64, "seq_len": 32, "n_pairs": 2, "n_queries": 2},
            **VISION_OPTIONS,
        },
        d_model=32,
        n_layers=2,
        n_heads=2,
        steps=20,
        batch_size=8,
        warmup=2,
        eval_every=10,
        eval_batches=1,
        eval_batch_size=16,
        diag_batches=1,
        diag_batch_size=8,
    ),
    "default": Preset(
        name="default",
        description=(
            "a first look at every mixer: one seed, 2-layer d=64 models; MQAR at the small size softmax "
            "attention solves in a few hundred steps, at the better of two learning rates with early stopping; "
            "short text (documents with BOS) and idle runs; two worker processes"
        ),
        tasks=("mqar", "text", "idle"),
        task_options={
            # the smallest MQAR softmax attention was validated on here (>= 0.99 by step 700 at batch 64,
            # 0.94 at step 300); at batch 32 it sits on the loss = ln(kv) plateau
            "mqar": {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 4},
            "text": {"seq_len": 64, "max_bytes": 1_000_000},
            "idle": {"vocab_size": 128, "seq_len": 64, "n_pairs": 4, "n_queries": 4},
            **VISION_OPTIONS,
        },
        d_model=64,
        n_layers=2,
        n_heads=4,
        steps=100,
        batch_size=16,
        warmup=10,
        eval_every=50,
        eval_batches=2,
        eval_batch_size=32,
        diag_batches=2,
        diag_batch_size=16,
        # MQAR leaves its loss = ln(kv) plateau around step 200-300 here: a cosine squeezed into 300 steps
        # at lr 3e-3 kept softmax attention at 0.31; a constant lr 1e-3 after warmup reached 0.945 / 0.793
        # (seeds 0 / 1) by step 300 and 1.00 by step 350 (d=32 stayed at 0.53 after 600 steps). Each mixer
        # gets lr 1e-3, and 3e-3 where 1e-3 did not solve, with early stopping at 0.99
        task_overrides={
            "mqar": {
                "steps": 400,
                "batch_size": 64,
                "lr": 1e-3,
                "lrs": (1e-3, 3e-3),
                "lrs_until_solved": True,
                "early_stop": 0.99,
                "warmup": 30,
                "min_lr_ratio": 1.0,
                "eval_every": 50,
            },
            "idle": {"steps": 50},  # a first look only: its outliers need the reproduce preset's 2000 steps
        },
        workers=2,
    ),
    "reproduce": Preset(
        name="reproduce",
        description=(
            "the papers' directional effects over 3 seeds: sinks, massive activations, outliers and the W8A8 "
            "gap of the softmax-family gates on 4-layer models (idle, text); recall of attention vs "
            "fixed-state mixers on 2-layer models (mqar)"
        ),
        tasks=("idle", "text", "mqar"),
        task_options={
            "idle": {"vocab_size": 128, "seq_len": 128, "n_pairs": 4, "n_queries": 4},
            "text": {"seq_len": 128},
            # validated here: softmax attention reaches >= 0.99 by step ~1200 at batch 64, lr 1e-3
            "mqar": {"vocab_size": 64, "seq_len": 32, "num_kv_pairs": 4},
            **VISION_OPTIONS,
        },
        d_model=64,
        n_layers=4,
        n_heads=4,
        steps=2000,
        batch_size=16,
        lr=3e-3,
        warmup=100,
        eval_every=500,
        eval_batches=4,
        eval_batch_size=32,
        diag_batches=4,
        diag_batch_size=16,
        seeds=3,
        workers=2,
        mixers=("softmax", "gated_softmax", "clipped_softmax", "gated_heads"),
        task_overrides={
            # the sink study: softmax and its G1 output gate in a Llama-style (RoPE, RMSNorm, SwiGLU) and a
            # GPT-2-style LM (learned positions, LayerNorm, GELU), on documents with BOS
            "text": {
                "steps": 1000,
                "eval_every": 250,
                "mixers": (
                    "softmax",
                    "gated_softmax",
                    "clipped_softmax",
                    "gated_heads",
                    "softmax[arch=gpt2]",
                    "gated_softmax[arch=gpt2]",
                ),
            },  # fmt: skip
            "mqar": {
                "n_layers": 2,
                "steps": 1600,
                "batch_size": 64,
                "lr": 1e-3,
                "min_lr_ratio": 1.0,  # as in the validation run, whose cosine over 4000 steps stayed ~lr
                "eval_every": 200,
                "mixers": ("softmax", "gated_softmax", "gated_deltanet", "lina"),
            },
        },
    ),
    "vision": Preset(
        name="vision",
        description=(
            "feature-map gates and vision mixers on the scikit-learn digits, 3 seeds: classification with "
            "a small CNN or ViT-like stack, stroke segmentation by digit with a one-skip U-Net (Dice)"
        ),
        tasks=("digits", "digits_seg"),
        # segmentation at the digits' own 8 x 8 (upsample=1): the ViT-like stacks at 16 x 16 cost 4x the CPU
        task_options={"digits": {}, "digits_seg": {"upsample": 1}},
        d_model=16,
        n_layers=2,
        n_heads=2,
        steps=300,
        batch_size=32,
        lr=3e-3,
        warmup=20,
        eval_every=100,
        eval_batches=12,  # 12 x 32 >= the 359 held-out images: the evaluation covers all of them
        eval_batch_size=32,
        diag_batches=1,
        diag_batch_size=8,
        seeds=3,
        mixer_options=dict(VISION_MIXER_OPTIONS),
    ),
}


ZOOLOGY_LRS = (1e-4, 4.6e-4, 2.2e-3, 1e-2)  # numpy.logspace(-4, -2, 4), as in Zoology's Figure 2


def _zoology_grid(
    points: tuple[tuple[int, int], ...], dims: tuple[int, ...], batches: dict[int, int]
) -> tuple:
    """MQAR grid points: each (seq_len, num_kv_pairs) at each d_model, the batch by seq_len."""
    return tuple(
        {"task_options": {"seq_len": T, "num_kv_pairs": kv}, "d_model": d, "batch_size": batches[T]}
        for T, kv in points
        for d in dims
    )


PRESETS["zoology"] = Preset(
    name="zoology",
    description=(
        "Zoology's Figure 2 (Arora et al., 2023) sized for one GPU: MQAR recall of every causal mixer at "
        "(T, kv pairs) (64, 4), (128, 8), (256, 16), (512, 64) and d_model 64-512, 2 layers, the best of "
        "four learning rates, early stop at 0.99 accuracy"
    ),
    tasks=("mqar",),
    task_options={"mqar": {"vocab_size": 8192, "seq_len": 64, "num_kv_pairs": 4}},
    n_layers=2,
    n_heads=1,  # Zoology's attention has one head
    steps=8000,  # about Zoology's 64 epochs of 100k examples at batch 512 (12.5k steps), early-stopped
    batch_size=256,
    lr=1e-3,
    warmup=200,
    eval_every=250,
    eval_batches=4,
    eval_batch_size=256,
    diag_batches=1,
    diag_batch_size=16,
    lrs=ZOOLOGY_LRS,
    early_stop=0.99,
    grid={
        "mqar": _zoology_grid(
            ((64, 4), (128, 8), (256, 16), (512, 64)),
            (64, 128, 256, 512),
            {64: 512, 128: 512, 256: 256, 512: 128},
        )
    },  # fmt: skip
)

PRESETS["zoology_cpu"] = PRESETS["zoology"].replace(
    name="zoology_cpu",
    description=(
        "the CPU form of the zoology preset (under 30 minutes on 2 cores, as two --shard processes): MQAR "
        "of every causal mixer at (T, kv pairs) (8, 2) and (16, 4), d_model 32 and 64, 2 layers, the best "
        "of two learning rates (the second only where the first did not solve), early stop at 0.99"
    ),
    task_options={"mqar": {"vocab_size": 32, "seq_len": 16, "num_kv_pairs": 4}},
    n_heads=4,
    steps=400,
    batch_size=64,
    warmup=20,
    min_lr_ratio=1.0,  # a constant learning rate after warmup: MQAR leaves its plateau late
    eval_every=50,
    eval_batches=2,
    eval_batch_size=64,
    diag_batches=1,
    diag_batch_size=8,
    lrs=(1e-3, 3e-3),
    lrs_until_solved=True,
    workers=2,
    grid={"mqar": _zoology_grid(((8, 2), (16, 4)), (32, 64), {8: 64, 16: 64})},
)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name]
