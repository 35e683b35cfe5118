"""The running sums causal Flow-Attention carries from token to token."""

from __future__ import annotations

from typing import NamedTuple

import torch


class FlowState(NamedTuple):
    """State of causal Flow-Attention after n tokens, all fp32 (a tuple, so it slices and stacks per field).

    kv: (B, H, K, V) sum of phi(k_s)^T (v_s c_s) with c_s the competition weight.
    k_sum, q_sum: (B, H, K) sums of phi(k_s) and phi(q_s) (incoming / outgoing flow).
    k_out, q_in: (B, H, K) sums of phi(k_s) O_s and phi(q_s) I_s (conservation).
    exp_sum: (B, H) sum of exp(conserved outgoing flow) (the running softmax denominator).
    count: (B, H) tokens seen, n (the causal version normalises by position).
    """

    kv: torch.Tensor
    k_sum: torch.Tensor
    q_sum: torch.Tensor
    k_out: torch.Tensor
    q_in: torch.Tensor
    exp_sum: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, B: int, H: int, K: int, V: int, device=None) -> FlowState:
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)
        return cls(z(B, H, K, V), z(B, H, K), z(B, H, K), z(B, H, K), z(B, H, K), z(B, H), z(B, H))

    def float(self) -> FlowState:
        return FlowState(*(t.float() for t in self))

    def select(self, start: int, end: int) -> FlowState:
        """Batch rows start:end of every field."""
        return FlowState(*(t[start:end] for t in self))

    @classmethod
    def cat(cls, states: list[FlowState]) -> FlowState:
        return cls(*(torch.cat(fields, dim=0) for fields in zip(*states)))


def check_flow_state(state, B: int, H: int, K: int, V: int, device) -> FlowState:
    """Validate an initial state: a FlowState (or 7-tuple) with the shapes above."""
    if not isinstance(state, tuple) or len(state) != len(FlowState._fields):
        raise TypeError(
            f"initial_state must be a FlowState (a tuple of {len(FlowState._fields)} tensors: "
            f"{', '.join(FlowState._fields)}), got {type(state).__name__}"
        )
    state = FlowState(*state)
    shapes = FlowState((B, H, K, V), (B, H, K), (B, H, K), (B, H, K), (B, H, K), (B, H), (B, H))
    for name, tensor, shape in zip(FlowState._fields, state, shapes):
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point:
            raise TypeError(
                f"initial_state.{name} must be a floating-point tensor, got {type(tensor).__name__}"
            )
        if tuple(tensor.shape) != shape:
            raise ValueError(f"initial_state.{name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"initial_state.{name} is on {tensor.device} but q is on {device}")
    return state
