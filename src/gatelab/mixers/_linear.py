"""What the linear-attention mixers share: the decoding state they carry between calls, and the one forward
every one of them runs (features, the op in its chunked or step form, the output, the state), each mixer
writing only its hooks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn as nn

from ._base import HeadDimConfig, Mixer, StateSignature, gpt2_init


@dataclass
class RecurrentState:
    """State a recurrent mixer carries between calls.

    state: the recurrent memory, (B, H, K, V) fp32 for linear attention (or a tuple of tensors where the
    mechanism needs more, e.g. running normalisers); conv: the last inputs of short causal convolutions
    (B, kernel - 1, C) by name; length: tokens seen so far; signature: the mechanism, batch and heads it
    was made for.
    """

    state: torch.Tensor | tuple[torch.Tensor, ...]
    length: int
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    signature: StateSignature | None = field(default=None, kw_only=True)

    @property
    def nbytes(self) -> int:
        tensors = self.state if isinstance(self.state, tuple) else (self.state,)
        tensors = tensors + tuple(self.conv.values())
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class OpInputs:
    """What a linear mixer's ``features`` hook hands the shared forward: the op's positional ``args`` and
    keyword ``options`` (the forward adds the state, the chunk size and the backend), the short-convolution
    inputs to carry (``conv``) and whatever its output and internals read (``extra``)."""

    args: tuple
    options: dict = field(default_factory=dict)
    conv: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)


class LinearMixer(Mixer):
    """Base class of the mixers whose decoding state is a RecurrentState. The one forward:

        inputs = features(x, start, conv)                 # projections, feature maps, gates
        o, final = op(*inputs.args, **inputs.options,     # chunked form for a prefill, step form for a token
                      initial_state=..., chunk_size=..., backend=step_backend(x))
        y = o_proj(gate_output(o, x, inputs))             # norm and output gate
        state = RecurrentState(final, start + T, inputs.conv)

    Subclasses set ``op`` (``staticmethod(<op>)``) and write ``features``, ``gate_output`` (default: heads
    concatenated), ``internals`` and ``state_dims`` where their widths are not (H, D, D).
    """

    op: ClassVar[Callable]

    def features(self, x: torch.Tensor, start: int, conv: dict[str, torch.Tensor]) -> OpInputs:
        """x (B, T, d_model), its first token at position ``start``, the carried convolution inputs."""
        raise NotImplementedError  # pragma: no cover - abstract

    def gate_output(self, o: torch.Tensor, x: torch.Tensor, inputs: OpInputs) -> torch.Tensor:
        """The op's output (B, T, H, V) -> the output projection's input (B, T, H * V)."""
        return o.reshape(*o.shape[:2], -1)

    def internals(self, inputs: OpInputs, state) -> dict:
        """Diagnostics of a call (``state``: the carried state, None for a fresh sequence)."""
        return {}

    def state_dims(self) -> tuple[int, int, int]:
        c = self.config
        return c.n_heads, c.dim, c.dim

    def carried(self, state, batch: int) -> tuple[torch.Tensor | tuple[torch.Tensor, ...] | None, int, dict]:
        """The op's ``initial_state``, the tokens seen so far and the convolution inputs, from the state this
        mixer returned (None: a fresh sequence)."""
        if state is None:
            return None, 0, {}
        self.check_state(state, RecurrentState, batch)
        return state.state, state.length, state.conv

    def step_backend(self, x: torch.Tensor) -> str:
        """The configured backend, or "recurrent" for one token at a time (decoding) of a causal mixer on CPU
        with "auto": the step form computes the same function without padding a whole chunk."""
        backend = self.config.backend
        one_step = self.config.causal and x.shape[1] == 1 and not x.is_cuda
        return "recurrent" if backend == "auto" and one_step else backend

    def _forward(self, x, state, return_internals):
        c = self.config
        B, T, _ = x.shape
        initial_state, start, conv = self.carried(state, B)
        inputs = self.features(x, start, conv)
        o, final = self.op(*inputs.args, **inputs.options, initial_state=initial_state,
                           output_final_state=c.causal, chunk_size=c.chunk_size,
                           backend=self.step_backend(x))  # fmt: skip
        y = self.o_proj(self.gate_output(o, x, inputs))
        new_state = None
        if c.causal:
            new_state = RecurrentState(final, start + T, inputs.conv, signature=self.state_signature(B))
        return y, new_state, self.internals(inputs, state) if return_internals else {}


class QKVLinearMixer(LinearMixer):
    """A LinearMixer with q, k, v projections d_model -> H * D and an output projection back, from a
    HeadDimConfig with a ``bias`` option."""

    def __init__(self, config: HeadDimConfig):
        super().__init__(config)
        c = config
        width = c.n_heads * c.dim
        self.q_proj = nn.Linear(c.d_model, width, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, width, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, width, bias=c.bias)
        self.o_proj = nn.Linear(width, c.d_model, bias=c.bias)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, d_model) -> q, k, v (B, T, H, D)."""
        B, T, _ = x.shape
        H, D = self.config.n_heads, self.config.dim
        return tuple(proj(x).view(B, T, H, D) for proj in (self.q_proj, self.k_proj, self.v_proj))

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        """GPT-2 style init of the projections (other parameters keep theirs)."""
        gpt2_init((self.q_proj, self.k_proj, self.v_proj), self.o_proj, std, n_layers)
