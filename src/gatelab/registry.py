"""The registry: one key per mechanism, mapped to its config, module, op, backends and paper.

Mechanisms register themselves from their mixer file (``mixers/<key>.py``) with :func:`register`. The
registry imports every module of the packages in ``_PACKAGES`` the first time it is asked, so adding a
mechanism never means editing a shared list.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn as nn


@dataclass(frozen=True)
class MechanismSpec:
    """What the rest of gatelab needs to know about one mechanism."""

    key: str  # short snake_case name used everywhere: ops/<key>, mixers/<key>.py, CLI, tests
    family: str  # "softmax", "linear", "sparse", "gate", ...
    config_cls: type  # dataclass validated in __post_init__
    module_cls: type[nn.Module]  # built as module_cls(config)
    paper: str  # "Title (Authors, year)"
    op: Callable | None = None  # functional form in gatelab.ops, if any
    backends: tuple[str, ...] = ("reference",)
    causal: bool = True  # usable as a causal (decoder) mixer
    bidirectional: bool = False  # usable without a causal mask (encoders, vision)
    status: str = "stable"
    notes: str = ""
    extra: dict = field(default_factory=dict)


_REGISTRY: dict[str, MechanismSpec] = {}
_KEYS: dict[type, str] = {}  # class -> key, filled by mechanism_key
_LOADED = False
_PACKAGES = ("gatelab.mixers", "gatelab.gates", "gatelab.routers")


def register(spec: MechanismSpec) -> MechanismSpec:
    if spec.key in _REGISTRY and _REGISTRY[spec.key].module_cls is not spec.module_cls:
        raise ValueError(f"mechanism key {spec.key!r} is registered twice")
    _REGISTRY[spec.key] = spec
    return spec


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    for package_name in _PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.iter_modules(package.__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


def mechanism_key(cls: type) -> str:
    """The key of the mechanism whose module or config class is ``cls`` or, for a subclass, its nearest
    registered base; the class name when none is registered (a base class such as AttentionConfig)."""
    if cls in _KEYS:  # asked at every decoding step (a state's signature): found once, kept
        return _KEYS[cls]
    for base in cls.__mro__:
        for spec in _REGISTRY.values():
            if base is spec.module_cls or base is spec.config_cls:
                _KEYS[cls] = spec.key
                return spec.key
    return cls.__name__


def get(key: str) -> MechanismSpec:
    """The spec of mechanism ``key``; a clear error lists the known keys."""
    _load_all()
    if not isinstance(key, str):
        raise TypeError(f"mechanism key must be a str, got {type(key).__name__}")
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown mechanism {key!r}; known mechanisms: {known}")
    return _REGISTRY[key]


def list_mechanisms(family: str | None = None, causal: bool | None = None) -> list[MechanismSpec]:
    """All registered mechanisms, sorted by family then key; optionally filtered."""
    _load_all()
    specs = sorted(_REGISTRY.values(), key=lambda s: (s.family, s.key))
    if family is not None:
        specs = [s for s in specs if s.family == family]
    if causal is not None:
        specs = [s for s in specs if s.causal == causal]
    return specs


def make_mixer(key: str, **options) -> nn.Module:
    """Build the mixer registered under ``key`` from ``<Key>Config(**options)``.

    >>> mixer = make_mixer("gated_softmax", d_model=256, n_heads=4, gate="elementwise")
    >>> y, state = mixer(x)  # x (B, T, d_model)
    """
    spec = get(key)
    names = sorted(f.name for f in dataclasses.fields(spec.config_cls))
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise TypeError(f"{key}: unknown options {', '.join(unknown)}; valid options: {', '.join(names)}")
    try:
        config = spec.config_cls(**options)
    except ValueError as error:  # a range check of the mechanism's own: say whose option it is
        if str(error).startswith(f"{key}: "):
            raise
        raise ValueError(f"{key}: {error}") from None
    return spec.module_cls(config)
