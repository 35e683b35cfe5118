"""What every mixer shares: the config base class and the call convention.

    y, state = mixer(x, state=None)                         # x (B, T, d_model) -> y (B, T, d_model)
    y, state, internals = mixer(x, state, return_internals=True)

``state`` is whatever the mixer needs to continue the sequence (a KV cache, a recurrent state):
running a prefix and then continuing token by token gives the outputs of one parallel pass. A state
carries a :class:`StateSignature` (mechanism, batch, heads, dims); a mixer refuses any other.
Every config option is checked against its annotation (:func:`check_fields`) before the mechanism's own
checks run.
``internals`` is a dict for diagnostics, e.g. "attn" (B, H, T, S) probabilities and "gate" values;
it is only computed when asked for, so the normal path pays nothing.
"""

from __future__ import annotations

import functools
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from gatelab.ops.common.checks import check_choice
from gatelab.registry import mechanism_key

FINITE = {"finite": False}  # field(metadata=FINITE): a float option that may be inf or nan


@functools.cache
def _field_types(config_cls: type) -> dict:
    return typing.get_type_hints(config_cls)


def _describe(hint) -> str:
    """'an int', 'a float', 'a tuple of int', 'an int or None', ... for an annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_describe(args[0]).split(' ', 1)[1]}"
        return f"a tuple ({', '.join(_describe(a).split(' ', 1)[1] for a in args)})"
    names = {bool: "a bool (True or False)", int: "an int", float: "a float", str: "a str", type(None): "None",
             tuple: "a tuple"}  # fmt: skip
    return names.get(hint, f"a {getattr(hint, '__name__', hint)}")


def _matches(value, hint) -> bool:
    """Whether ``value`` has the type ``hint`` names. A bool is no int or float (``True`` is not 1 here), an
    int is a float, a list is a tuple (a config read back from JSON holds lists)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is tuple or origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_matches(v, args[0]) for v in value)
        return not args or (len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args)))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is type(None):
        return value is None
    return not isinstance(hint, type) or isinstance(value, hint)


def _floats(value) -> Iterable[float]:
    if isinstance(value, float):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _floats(v)


def check_fields(config) -> None:
    """Every field of a config dataclass against its annotation, in one place for every mixer config:
    TypeError when the type is wrong (a bool must be True or False, an int no bool, a float a number), and
    ValueError for a float that is nan or infinite (unless the field's metadata is ``FINITE``). The error
    names the mechanism, the option, what it takes and what it got."""
    hints = _field_types(type(config))
    mechanism = mechanism_key(type(config))
    for f in fields(config):
        value = getattr(config, f.name)
        hint = hints.get(f.name, typing.Any)
        if not _matches(value, hint):
            raise TypeError(
                f"{mechanism}: option {f.name!r} must be {_describe(hint)}, got {value!r} "
                f"({type(value).__name__})"
            )
        if f.metadata.get("finite", True) and any(not math.isfinite(v) for v in _floats(value)):
            raise ValueError(f"{mechanism}: option {f.name!r} must be finite, got {value!r}")


@dataclass
class MixerConfig:
    d_model: int = 256
    n_heads: int = 4
    causal: bool = True
    backend: str = "auto"

    def __post_init__(self):
        check_fields(self)
        for name in ("d_model", "n_heads"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{mechanism_key(type(self))}: {name} must be a positive int, got {value!r}")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


def check_probability(name: str, value: float, low_open: bool = True, high_open: bool = True) -> None:
    ok = (0 < value if low_open else 0 <= value) and (value < 1 if high_open else value <= 1)
    if not isinstance(value, int | float) or not ok:
        raise ValueError(
            f"{name} must be in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, got {value!r}"
        )


@dataclass(frozen=True)
class StateSignature:
    """What a decoding state was made for: the mechanism that returned it, the batch size, the heads it
    holds (key/value heads for a KV cache) and their key and value widths. A mixer refuses a state whose
    signature is not the one it would return (a state of another mechanism, batch or head layout)."""

    mechanism: str
    batch: int
    heads: int
    key_dim: int
    value_dim: int

    def describe(self) -> str:
        return (
            f"{self.mechanism} (batch {self.batch}, {self.heads} heads, key dim {self.key_dim}, "
            f"value dim {self.value_dim})"
        )

    def check(self, given: StateSignature | None) -> None:
        """ValueError unless ``given`` (the state's signature) is this one."""
        if given != self:
            got = "a state without a signature" if given is None else f"a state of {given.describe()}"
            raise ValueError(f"state: this mixer continues a state of {self.describe()}, got {got}")


@dataclass
class HeadDimConfig(MixerConfig):
    """A config with one head dim for q, k and v: ``head_dim`` or, when None, d_model // n_heads."""

    head_dim: int | None = None  # None: d_model // n_heads

    def __post_init__(self):
        super().__post_init__()
        check_positive("head_dim", self.head_dim, allow_none=True)
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), or give head_dim"
            )

    @property
    def dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass
class HeadsConfig(HeadDimConfig):
    """Adds grouped-query heads: ``n_kv_heads`` key/value heads (None: as many as n_heads)."""

    n_kv_heads: int | None = None  # None: as many as n_heads; fewer gives grouped-query attention

    def __post_init__(self):
        super().__post_init__()
        check_positive("n_kv_heads", self.n_kv_heads, allow_none=True)
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads


def check_input(x, d_model: int, spatial_dims: int, layout: str) -> None:
    """A mixer's input: a floating-point tensor (B, *spatial, d_model) with at least one sequence and one
    token (a batch of none gives no work and no answer: it is refused, not passed on to the op)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != spatial_dims + 2 or x.shape[-1] != d_model:
        named = layout.replace("d_model)", f"{d_model})")
        raise ValueError(f"x must have shape {named} {layout}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"x must hold at least one sequence (B >= 1), got shape {tuple(x.shape)}")
    if any(n == 0 for n in x.shape[1:-1]):
        raise ValueError(f"x must hold at least one token (T >= 1), got shape {tuple(x.shape)}")


def gpt2_init(inputs: Iterable[nn.Linear], output: nn.Linear, std: float, n_layers: int) -> None:
    """GPT-2 style init: weights N(0, std), the output projection's scaled by 1/sqrt(2 * n_layers); zero
    biases."""
    inputs = tuple(inputs)
    for lin in inputs:
        nn.init.normal_(lin.weight, std=std)
    nn.init.normal_(output.weight, std=std / math.sqrt(2 * n_layers))
    for lin in (*inputs, output):
        if lin.bias is not None:
            nn.init.zeros_(lin.bias)


class Mixer(nn.Module):
    """Base class: validates the input and the state, then calls ``_forward``."""

    config_cls: type = MixerConfig

    def __init__(self, config: MixerConfig):
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        self.config = config

    @property
    def mechanism(self) -> str:
        """The registry key of this mixer's mechanism (the class name for an unregistered one)."""
        return mechanism_key(type(self))

    def state_dims(self) -> tuple[int, int, int]:
        """(heads, key dim, value dim) of the decoding state. Default: a KV cache of a HeadsConfig mixer."""
        c = self.config
        return c.kv_heads, c.dim, c.dim

    def state_signature(self, batch: int) -> StateSignature:
        """The signature of the state this mixer returns for a batch of ``batch`` sequences."""
        return StateSignature(self.mechanism, batch, *self.state_dims())

    def check_state(self, state, state_cls: type, batch: int, under: str = "") -> None:
        """TypeError unless ``state`` is a ``state_cls`` (the state this mixer returns; ``under`` names what
        it runs under, e.g. a cache policy); ValueError unless it was made for this mechanism, batch and
        heads."""
        if type(state) is not state_cls:
            raise TypeError(f"state must be the {state_cls.__name__} this mixer returned{under}, "
                            f"got {type(state).__name__}")  # fmt: skip
        self.state_signature(batch).check(state.signature)

    def forward(self, x: torch.Tensor, state=None, *, return_internals: bool = False):
        check_input(x, self.config.d_model, 1, "(B, T, d_model)")
        if state is not None and not self.config.causal:
            raise ValueError("a state (decoding) needs a causal mixer; this one was built with causal=False")
        y, state, internals = self._forward(x, state, return_internals)
        return (y, state, internals) if return_internals else (y, state)

    def _forward(self, x, state, return_internals):  # pragma: no cover - abstract
        raise NotImplementedError


__all__ = [
    "MixerConfig",
    "HeadDimConfig",
    "HeadsConfig",
    "Mixer",
    "gpt2_init",
    "check_positive",
    "check_probability",
    "check_choice",
    "check_fields",
    "check_input",
    "StateSignature",
    "FINITE",
]
