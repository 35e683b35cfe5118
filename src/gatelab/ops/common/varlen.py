"""Packed variable-length batches (``cu_seqlens``, as flash-attn): run an op on each sequence of a
packed (1, T, ...) batch with its own initial state, and put the pieces back together."""

from __future__ import annotations

from collections.abc import Callable

import torch

State = torch.Tensor | tuple[torch.Tensor, ...]  # a tensor, or a tuple of them (e.g. flow's FlowState)


def run_packed(
    fn: Callable[..., tuple[torch.Tensor, State | None]],
    cu_seqlens: torch.Tensor,
    tensors: tuple[torch.Tensor, ...],
    initial_state: State | None,
    output_final_state: bool,
    **options,
) -> tuple[torch.Tensor, State | None]:
    """Call ``fn(*pieces, initial_state=..., output_final_state=..., **options)`` per sequence.

    tensors: (1, T, ...) each, cut along T at cu_seqlens (N+1,).
    initial_state: (N, H, K, V), a (named) tuple of tensors with N rows each, or None. Returns o (1, T, ...)
    and the final states, N rows in the same layout, or None.
    Time-independent tensors (e.g. a per-head decay (H,)) go through ``options`` unchanged.
    """
    bounds = cu_seqlens.tolist()
    n = len(bounds) - 1
    first = initial_state[0] if isinstance(initial_state, tuple) else initial_state  # a tuple's first field
    if first is not None and first.shape[0] != n:
        raise ValueError(
            f"initial_state must have one state per sequence ({n}) when cu_seqlens is given, "
            f"got shape {tuple(first.shape)}"
        )
    outputs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        pieces = tuple(t[:, start:end] for t in tensors)
        h0 = None if initial_state is None else _rows(initial_state, i, i + 1)
        o, state = fn(*pieces, initial_state=h0, output_final_state=output_final_state, **options)
        outputs.append(o)
        finals.append(state)
    o = torch.cat(outputs, dim=1)
    if not output_final_state:
        return o, None
    if isinstance(finals[0], torch.Tensor):
        return o, torch.cat(finals, dim=0)
    return o, type(finals[0])(*(torch.cat(fields, dim=0) for fields in zip(*finals)))


def _rows(state: State, start: int, end: int) -> State:
    """Rows start:end of a state tensor, or of every field of a state tuple (keeping its type)."""
    if isinstance(state, torch.Tensor):
        return state[start:end]
    return type(state)(*(t[start:end] for t in state))
