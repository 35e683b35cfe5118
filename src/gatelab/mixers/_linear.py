"""What the linear-attention mixers share: the decoding state they carry between calls, the state check,
the head-dim config and the q/k/v/o projections with their GPT-2 style init."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from ._base import HeadDimConfig, Mixer, gpt2_init


@dataclass
class RecurrentState:
    """State a recurrent mixer carries between calls.

    state: the recurrent memory, (B, H, K, V) fp32 for linear attention (or a tuple of tensors where the
    mechanism needs more, e.g. running normalisers); conv: the last inputs of short causal convolutions
    (B, kernel - 1, C) or None; length: tokens seen so far.
    """

    state: torch.Tensor | tuple[torch.Tensor, ...]
    length: int
    conv: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        tensors = self.state if isinstance(self.state, tuple) else (self.state,)
        tensors = tensors + tuple(self.conv.values())
        return sum(t.numel() * t.element_size() for t in tensors)


class LinearMixer(Mixer):
    """Base class of the mixers whose decoding state is a RecurrentState."""

    def carried(self, state) -> tuple[torch.Tensor | tuple[torch.Tensor, ...] | None, int]:
        """The op's ``initial_state`` and the number of tokens seen so far, from the state this mixer
        returned (None: a fresh sequence)."""
        if state is None:
            return None, 0
        if not isinstance(state, RecurrentState):
            raise TypeError(
                f"state must be the RecurrentState this mixer returned, got {type(state).__name__}"
            )
        return state.state, state.length

    def step_backend(self, x: torch.Tensor) -> str:
        """The configured backend, or "recurrent" for one token at a time (decoding) on CPU with "auto": the
        step form computes the same function without padding a whole chunk."""
        backend = self.config.backend
        return "recurrent" if backend == "auto" and x.shape[1] == 1 and not x.is_cuda else backend


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
