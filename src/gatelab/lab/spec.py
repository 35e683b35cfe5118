"""Run specs and named variants: the typed description of one training run, and the one place that turns it
into the task, the LMConfig, the TrainConfig and the memory check (``gatelab compare``, ``cache`` and
``train`` all build their models here).

    >>> variants = parse_variants("softmax,gated_softmax[gate=headwise],gated_softmax[gate=elementwise]")
    >>> [v.name for v in variants]
    ['softmax', 'gated_softmax[gate=headwise]', 'gated_softmax[gate=elementwise]']
    >>> from gatelab.lab.presets import PRESETS
    >>> spec = PRESETS["quick"].run_spec("mqar", variants[1], seed=0)
    >>> task, model, train_config = build(spec, out_dir="runs/x")
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

MEMORY_FRACTION = 0.8  # refuse sizes whose estimate exceeds this share of the available memory
_NAME = re.compile(r"[A-Za-z0-9_.+-]+")  # an explicit variant name: it names folders too


def parse_value(text: str):
    """An option value from the command line: JSON (ints, floats, true/false, null, lists), Python's
    True / False / None, else the bare string (``headwise``)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {"True": True, "False": False, "None": None}.get(text, text)


def split_list(text: str, what: str) -> list[str]:
    """Split a comma-separated list at the commas outside brackets (``a,b[x=1,y=2]`` -> 2 items); empty
    entries are dropped, an empty list is an error."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth < 0 or depth > 1:
            raise ValueError(f"{what}: unbalanced brackets in {text!r}")
        if char == "," and depth == 0:
            items.append(current.strip())
            current = ""
        else:
            current += char
    if depth:
        raise ValueError(f"{what}: unbalanced brackets in {text!r}")
    items = [item for item in [*items, current.strip()] if item]
    if not items:
        raise ValueError(f"{what}: expected a comma-separated list, got {text!r}")
    return items


@dataclass(frozen=True)
class Variant:
    """A mechanism with options under a name: the unit ``gatelab compare`` trains and tabulates.

    A bare key is named by the key (``softmax``); a variant with options by its text
    (``gated_softmax[gate=headwise]``) unless given ``name=`` among its options. The LM's architecture
    options are options of the text too: ``arch=gpt2`` (positions, norm and MLP of lm.ARCHITECTURES),
    ``positions=learned|none``, ``norm=layer``, ``mlp=gelu|moe:<router>``."""

    name: str
    key: str
    options: dict = field(default_factory=dict)  # make_mixer options of this key (on top of a preset's)
    mlp: str = "swiglu"  # LMConfig.mlp: "swiglu" or "moe:<router>" (option mlp=... in the variant's text)
    mlp_options: dict = field(default_factory=dict)  # LMConfig.mlp_options (options mlp.NAME=... in the text)
    positions: str = "rope"  # LMConfig.positions: "rope", "learned" or "none"
    norm: str = "rms"  # LMConfig.norm: "rms" or "layer"

    def __post_init__(self):  # the key is checked against the registry where the variant is used
        from gatelab.lab.models.lm import NORMS, POSITIONS

        if not isinstance(self.options, dict) or not isinstance(self.mlp_options, dict):
            raise TypeError(f"variant {self.name!r}: options must be a dict, got {self.options!r}")
        if not isinstance(self.name, str) or not self.name or re.search(r"[\s/]", self.name):
            raise ValueError(f"variant name must be non-empty text without spaces or '/', got {self.name!r}")
        if self.positions not in POSITIONS:
            raise ValueError(
                f"variant {self.name!r}: positions must be one of {', '.join(POSITIONS)}, "
                f"got {self.positions!r}"
            )
        if self.norm not in NORMS:
            raise ValueError(
                f"variant {self.name!r}: norm must be one of {', '.join(NORMS)}, got {self.norm!r}"
            )

    @classmethod
    def of(
        cls,
        key: str,
        options: dict | None = None,
        name: str | None = None,
        mlp: str | None = None,
        mlp_options: dict | None = None,
        positions: str | None = None,
        norm: str | None = None,
        arch: str | None = None,
    ) -> Variant:
        """The variant of ``key`` with ``options`` (and an architecture other than the default: ``arch`` a
        key of lm.ARCHITECTURES, ``mlp`` / ``positions`` / ``norm`` on top of it; None: the arch's, or
        the default), named ``name`` or by its text."""
        from gatelab.lab.models.lm import DEFAULT_ARCH, architecture

        options, mlp_options = dict(options or {}), dict(mlp_options or {})
        base = architecture(arch) if arch is not None else DEFAULT_ARCH
        given = {"mlp": mlp, "positions": positions, "norm": norm}
        fields = {k: base[k] if v is None else v for k, v in given.items()}
        shown = {**options, **({"arch": arch} if arch is not None else {})}
        shown.update({k: v for k, v in given.items() if v is not None and v != base[k] and k == "mlp"})
        shown.update({f"mlp.{k}": v for k, v in mlp_options.items()})
        shown.update({k: v for k, v in given.items() if v is not None and v != base[k] and k != "mlp"})
        text = ",".join(f"{k}={_text(v)}" for k, v in shown.items())
        return cls(
            name or (f"{key}[{text}]" if shown else key), key, options, mlp_options=mlp_options, **fields
        )

    @property
    def arch(self) -> dict[str, str]:
        """This variant's architecture: {"positions", "norm", "mlp"} (the LMConfig fields)."""
        return {"positions": self.positions, "norm": self.norm, "mlp": self.mlp}

    def with_mlp(self, mlp: str) -> Variant:
        """This variant with ``mlp`` (``gatelab compare --mlp``): named by its text, or ``<name>+<mlp>``
        when it was given a name."""
        if self.mlp != "swiglu" or self.mlp_options:
            raise ValueError(f"--mlp: variant {self.name!r} already chooses its MLP ({self.mlp})")
        if self.positions != "rope" or self.norm != "rms":
            raise ValueError(f"--mlp: variant {self.name!r} chooses its architecture ({self.arch}); "
                             "give --mlp before --arch")  # fmt: skip
        if mlp == "swiglu":
            return self
        named = self.name != Variant.of(self.key, self.options).name
        return Variant.of(self.key, self.options, f"{self.name}+{mlp}" if named else None, mlp)

    def with_arch(self, arch: str) -> Variant:
        """This variant with the architecture ``arch`` (a key of lm.ARCHITECTURES; ``gatelab compare
        --arch``): named by its text, or ``<name>+<arch>`` when it was given a name. An MLP other than
        SwiGLU that the variant chose (or --mlp) stays; positions or a norm it chose are an error."""
        from gatelab.lab.models.lm import DEFAULT_ARCH, architecture

        fields = architecture(arch)  # checks the name
        if self.positions != "rope" or self.norm != "rms":
            raise ValueError(f"--arch: variant {self.name!r} already chooses its architecture ({self.arch})")
        if fields == DEFAULT_ARCH:
            return self
        mlp = None if self.mlp == "swiglu" else self.mlp
        plain = Variant.of(self.key, self.options, mlp=mlp, mlp_options=self.mlp_options)
        name = f"{self.name}+{arch}" if self.name != plain.name else None
        return Variant.of(self.key, self.options, name, mlp, self.mlp_options, arch=arch)

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``key`` or ``key[name=value,...]``; a ``name=`` option names the variant."""
        text = text.strip()
        key, bracket, rest = text.partition("[")
        if bracket and not rest.endswith("]"):
            raise ValueError(
                f"--mixers: variant {text!r} must end with ']', e.g. gated_softmax[gate=headwise]"
            )
        if bracket and not rest[:-1].strip():
            raise ValueError(f"--mixers: variant {text!r} has empty brackets; write {key.strip()!r}")
        options: dict = {}
        for item in split_list(rest[:-1], f"--mixers {text!r}") if bracket else []:
            name, equals, value = item.partition("=")
            if not equals or not name.strip():
                raise ValueError(f"--mixers: variant {text!r}: options are NAME=VALUE, got {item!r}")
            if name.strip() in options:
                raise ValueError(f"--mixers: variant {text!r} gives option {name.strip()!r} twice")
            options[name.strip()] = parse_value(value.strip())
        name = options.pop("name", None)
        if name is not None and (not isinstance(name, str) or not _NAME.fullmatch(name)):
            raise ValueError(
                f"--mixers: variant {text!r}: name= takes letters, digits and _.+-, got {name!r}"
            )
        fields = {k: options.pop(k, None) for k in ("mlp", "positions", "norm", "arch")}
        mlp_options = {k[4:]: options.pop(k) for k in [k for k in options if k.startswith("mlp.")]}
        from gatelab.lab.models.lm import ARCHITECTURES

        if fields["arch"] is not None and fields["arch"] not in ARCHITECTURES:
            raise ValueError(
                f"--mixers: variant {text!r}: arch must be one of {', '.join(ARCHITECTURES)}, "
                f"got {fields['arch']!r}"
            )
        return cls.of(key.strip(), options, name, mlp_options=mlp_options, **fields)

    @property
    def slug(self) -> str:
        return folder_name(self.name)

    def mixer_options(self, base: dict) -> dict:
        """LMConfig.mixer_options: ``base`` (a preset's, key or "*" -> options) with this variant's on top."""
        if not self.options:
            return dict(base)
        return {**base, self.key: {**base.get(self.key, {}), **self.options}}

    def to_dict(self) -> dict:
        out = {"key": self.key, "options": dict(self.options)}
        if self.mlp != "swiglu" or self.mlp_options:
            out.update(mlp=self.mlp, mlp_options=dict(self.mlp_options))
        if self.positions != "rope":
            out["positions"] = self.positions
        if self.norm != "rms":
            out["norm"] = self.norm
        return out


def folder_name(name: str) -> str:
    """A run's name as a folder name: ``gated_softmax[gate=headwise]`` -> ``gated_softmax-gate-headwise``."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", name).strip("-")


def _text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_variants(items: str | list) -> list[Variant]:
    """The variants of ``--mixers`` text, or of a list of variant texts and Variants; a name (or the folder
    name made of it) given twice is an error."""
    items = split_list(items, "--mixers") if isinstance(items, str) else list(items)
    variants = [item if isinstance(item, Variant) else Variant.parse(item) for item in items]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"--mixers lists a mixer twice: {names}")
    slugs = [v.slug for v in variants]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"--mixers: two variants share the folder name of their models: {slugs}; give name=")
    return variants


@dataclass(frozen=True)
class RunSpec:
    """One training run: the task, the LM (pattern, mixer options, sizes), the budget and the seed.

    Validated when made: the pattern against the registry, every mixer option by building the mixer's config
    (the error names the run), options for a mechanism outside the pattern are refused (they would be
    ignored), and the training fields by building a TrainConfig."""

    task: str
    task_options: dict = field(default_factory=dict)  # make_task options
    pattern: str = "softmax"
    name: str | None = None  # how results name the run (a variant's name); None: the pattern
    mixer_options: dict = field(default_factory=dict)  # LMConfig.mixer_options: key or "*" -> options
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    mlp_ratio: float = 4.0
    attention_gate: dict | None = None  # LMConfig.attention_gate
    mlp: str = "swiglu"  # LMConfig.mlp: "swiglu", "gelu" or "moe:<router>"
    mlp_options: dict = field(default_factory=dict)  # LMConfig.mlp_options
    positions: str = "rope"  # LMConfig.positions: "rope", "learned" or "none"
    norm: str = "rms"  # LMConfig.norm: "rms" or "layer"
    max_seq_len: int | None = None  # None: the task's sequence length
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    eval_batch_size: int | None = None
    early_stop: float | None = None  # TrainConfig.early_stop: stop when validation accuracy reaches it
    checkpoint_every: int = 0
    compile: bool = False
    diag_batches: int = 0  # batches of the diagnostics run after training (gatelab compare)
    diag_batch_size: int = 0  # their rows (counted in the memory estimate)
    seed: int = 0
    device: str = "cpu"
    parallel: str = "ddp"  # TrainConfig.parallel: "ddp" | "fsdp" under torchrun

    def __post_init__(self):
        from gatelab.lab.models.lm import parse_pattern
        from gatelab.lab.tasks import TASK_NAMES
        from gatelab.registry import get

        if self.task not in TASK_NAMES:
            raise ValueError(f"unknown task {self.task!r}; known tasks: {', '.join(TASK_NAMES)}")
        if not isinstance(self.mixer_options, dict) or not all(
            isinstance(v, dict) for v in self.mixer_options.values()
        ):
            raise TypeError(
                f"mixer_options must map a mechanism key or '*' to a dict, got {self.mixer_options!r}"
            )
        if self.vision:
            from gatelab.lab.tasks import _tasks

            if self.attention_gate is not None:
                raise ValueError(
                    f"{self.label}: attention_gate (KV-cache eviction) is for the LM, not {self.task}"
                )
            if self.positions != "rope" or self.norm != "rms":
                raise ValueError(f"{self.label}: positions / norm are options of the LM, not of {self.task} "
                                 f"(got positions={self.positions!r}, norm={self.norm!r})")  # fmt: skip
            segment = _tasks()[self.task].segment  # a class attribute: no data is loaded here
            self.vision_config(segment=segment, n_classes=2, image_size=8)  # the block and its options
            self.train_config()
            return
        keys = list(dict.fromkeys(parse_pattern(self.pattern, self.n_layers)))
        outside = sorted(set(self.mixer_options) - {"*", *keys})
        for key in outside:
            get(key)  # a typo is an unknown mechanism (the error lists the known ones)
        if outside:
            raise ValueError(
                f"{self.label}: mixer options for {', '.join(map(repr, outside))}, not in the pattern "
                f"{self.pattern!r} (layers: {', '.join(keys)}); they would be ignored"
            )
        for key in keys:
            check_mixer_options(key, self, self.label)
        self.check_mlp()
        self.train_config()  # the training fields' own checks

    @property
    def vision(self) -> bool:
        """A vision task: the model is lab.models.vision's backbone with ``pattern`` as its block."""
        from gatelab.lab.tasks import VISION_TASKS

        return self.task in VISION_TASKS

    def vision_config(self, task=None, *, segment=None, n_classes=None, image_size=None):
        """The VisionConfig of this run on ``task`` (its classes, image size and kind): ``pattern`` is the
        block ("cnn", a vision gate or a (B, H, W, C) mixer) and ``mixer_options`` its options; a
        feature_selection_gate takes ``routing_lr`` (Gradient Routing's gate lr, null: no routing)."""
        from gatelab.lab.models.vision import GATE_LR, VisionConfig

        outside = sorted(set(self.mixer_options) - {"*", self.pattern})
        if outside:
            raise ValueError(f"{self.label}: mixer options for {outside}, not the block {self.pattern!r}")
        options = {**self.mixer_options.get("*", {}), **self.mixer_options.get(self.pattern, {})}
        routing_lr = options.pop("routing_lr", GATE_LR) if self.pattern == "feature_selection_gate" else None
        try:
            config = VisionConfig(
                n_classes=task.vocab_size if task is not None else n_classes,
                image_size=task.image_size if task is not None else image_size,
                segment=task.segment if task is not None else segment,
                block=self.pattern,
                block_options=options,
                d_model=self.d_model,
                n_layers=self.n_layers,
                n_heads=self.n_heads,
                mlp_ratio=self.mlp_ratio,
                routing_lr=routing_lr,
                seed=self.seed,
            )
        except (TypeError, ValueError) as error:
            raise type(error)(f"{self.label}: {error}") from None
        if config.kind == "mixer":
            from gatelab.lab.models.vision import backbone_options

            given = backbone_options(self.pattern, config.image_size)
            check_mixer_options(self.pattern, self, self.label, given)
        return config

    @property
    def label(self) -> str:
        return self.name or self.pattern

    def check_mlp(self) -> None:
        """The MLP choice and its options, positions and norm, checked as the LM will (the error names the
        run)."""
        from gatelab.lab.models.lm import LMConfig

        sizes = ("d_model", "n_layers", "n_heads", "mlp_ratio", "pattern", "positions", "norm")
        try:
            LMConfig(**{k: getattr(self, k) for k in sizes}, mlp=self.mlp, mlp_options=self.mlp_options)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{self.label}: {error}") from None

    def replace(self, **changes) -> RunSpec:
        return dataclasses.replace(self, **changes)

    def _shared(self, config_cls) -> dict:
        """This spec's values of the fields ``config_cls`` has under the same names."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(config_cls) if hasattr(self, f.name)
        }

    def lm_config(self, task):
        """The LMConfig of this run on ``task`` (its vocabulary and, unless given, its sequence length)."""
        from gatelab.lab.models.lm import LMConfig

        return LMConfig(
            **{
                **self._shared(LMConfig),
                "vocab_size": task.vocab_size,
                "max_seq_len": self.max_seq_len or task.seq_len,
            }
        )

    def train_config(
        self, out_dir=None, *, resume: bool = False, overwrite: bool = False, progress: bool = False
    ):
        """The TrainConfig of this run; ``out_dir`` None trains without writing files."""
        from gatelab.lab.train import TrainConfig

        where = {
            "out_dir": None if out_dir is None else str(out_dir),
            "resume": resume,
            "overwrite": overwrite,
        }
        return TrainConfig(**{**self._shared(TrainConfig), **where, "progress": progress})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_mixer_options(key: str, spec: RunSpec, label: str, given: dict | None = None) -> None:
    """Build ``key``'s config with the options ``spec`` gives it, as the LM's blocks (or the vision
    backbone, which adds ``given``) will: a bad option is refused before any model is built, naming the
    run and the mechanism."""
    from gatelab.registry import get

    mechanism = get(key)
    options = {**(given or {}), **spec.mixer_options.get("*", {}), **spec.mixer_options.get(key, {})}
    names = {f.name for f in dataclasses.fields(mechanism.config_cls)}
    if {"layer_idx", "n_layers"} <= names:  # depth-dependent mixers get them from the LM's Block too
        options = {"layer_idx": 0, "n_layers": spec.n_layers, **options}
    try:
        from gatelab.lab.models.lm import mixer_rope_options

        options = mixer_rope_options(key, options, getattr(spec, "positions", "rope"))  # as the LM's Block
        mechanism.config_cls(d_model=spec.d_model, n_heads=spec.n_heads, **options)
    except TypeError as error:
        valid = ", ".join(sorted(names - {"d_model", "n_heads", "layer_idx", "n_layers"}))
        raise TypeError(f"{label}: {key} options {options}: {error}; valid options: {valid}") from None
    except ValueError as error:
        raise ValueError(f"{label}: {key} options {options}: {error}") from None


def available_memory(device: str) -> int:
    """Bytes free for this run: free GPU memory, or the available RAM."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def estimate_memory(sizes, seq_len: int, vocab_size: int) -> int:
    """A generous estimate of the peak bytes of one training run and its diagnostics (fp32), from the sizes
    alone (no model is built): the activations kept for backward (a dense (T, T) attention matrix per head
    included, as reference and linear-attention paths build), the logits and their gradient, parameters
    with AdamW state. ``sizes``: a RunSpec or a Preset (batch_size, n_layers, d_model, n_heads,
    diag_batch_size)."""
    B, T, L, d, H = sizes.batch_size, seq_len, sizes.n_layers, sizes.d_model, sizes.n_heads
    activations = B * T * L * (40 * d + 3 * H * T) * 4
    logits = 3 * B * T * vocab_size * 4
    diagnostics = sizes.diag_batch_size * T * L * (2 * H * T + 8 * d) * 4 * 2
    params = (vocab_size * d + L * 16 * d * d) * 4 * 4
    return activations + logits + diagnostics + params


def check_memory(sizes, task, device: str, available: int | None = None) -> None:
    """Refuse a run whose estimate exceeds MEMORY_FRACTION of the memory available on ``device``, before
    anything is allocated. ``sizes``: a RunSpec or a Preset."""
    need = estimate_memory(sizes, task.seq_len, task.vocab_size)
    available = available_memory(device) if available is None else available
    if need > MEMORY_FRACTION * available:
        raise ValueError(
            f"task {task.name!r} at batch {sizes.batch_size}, seq_len {task.seq_len}, d_model {sizes.d_model}, "
            f"{sizes.n_layers} layers needs about {need / 2**30:.1f} GiB, more than {MEMORY_FRACTION:.0%} of the "
            f"{available / 2**30:.1f} GiB available on {device}; lower --batch-size, --d-model or the number of "
            "layers, or use a smaller preset"
        )


def make_task(spec: RunSpec):
    from gatelab.lab.tasks import make_task

    return make_task(spec.task, **spec.task_options)


def build(spec: RunSpec, task=None, out_dir=None, *, resume=False, overwrite=False, progress=False):
    """The task (``task`` if given, else built from the spec), the LM and the TrainConfig of ``spec``; the
    memory estimate is checked before the model is built. Returns (task, model, train_config)."""
    from gatelab.lab.models.lm import LM

    task = make_task(spec) if task is None else task
    config = spec.vision_config(task) if spec.vision else spec.lm_config(task)
    check_memory(spec, task, spec.device)
    train_config = spec.train_config(out_dir, resume=resume, overwrite=overwrite, progress=progress)
    if spec.vision:
        from gatelab.lab.models.vision import VisionModel

        return task, VisionModel(config), train_config
    return task, LM(config), train_config


def train_run(spec: RunSpec, out_dir=None, *, resume=False, overwrite=False, progress=True, log=None):
    """Train the run ``spec`` (``gatelab train``): build it, train it, and with ``out_dir`` save the model,
    metrics.jsonl and train_summary.json there (``resume``: continue from its checkpoint; ``overwrite``:
    replace an earlier run). ``log(text)`` receives a line about the model before training and a summary
    after it (rank 0 under torchrun). Returns (model, TrainResult)."""
    from gatelab.lab.train import train
    from gatelab.lab.train.routing import routing_options

    task, model, config = build(spec, out_dir=out_dir, resume=resume, overwrite=overwrite, progress=progress)
    log = log if log is not None and int(os.environ.get("RANK", 0)) == 0 else None
    if log:
        layers = ", ".join(model.layer_keys)
        log(f"model: {model.num_parameters():,} parameters ({layers}); task: {json.dumps(task.describe())}")
    result = train(model, task, config, **routing_options(model, config))
    if log:
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final.items())
        saved = f"\nsaved model + metrics.jsonl + train_summary.json in {Path(out_dir)}" if out_dir else ""
        log(
            f"done: {result.steps} steps in {result.wall_s:.1f} s, {result.tokens_per_s:,.0f} tokens/s; {metrics}{saved}"
        )
    return model, result
