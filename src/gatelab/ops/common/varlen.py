"""Packed variable-length batches (``cu_seqlens``, as flash-attn): run an op on each sequence of a
packed (1, T, ...) batch with its own initial state, and put the pieces back together."""

from __future__ import annotations

from collections.abc import Callable

import torch


def run_packed(
    fn: Callable[..., tuple[torch.Tensor, torch.Tensor | None]],
    cu_seqlens: torch.Tensor,
    tensors: tuple[torch.Tensor, ...],
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    **options,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Call ``fn(*pieces, initial_state=..., output_final_state=..., **options)`` per sequence.

    tensors: (1, T, ...) each, cut along T at cu_seqlens (N+1,).
    initial_state: (N, H, K, V) or None. Returns o (1, T, ...) and the final states (N, H, K, V) or None.
    Time-independent tensors (e.g. a per-head decay (H,)) go through ``options`` unchanged.
    """
    bounds = cu_seqlens.tolist()
    n = len(bounds) - 1
    if initial_state is not None and initial_state.shape[0] != n:
        raise ValueError(
            f"initial_state must have one state per sequence ({n}) when cu_seqlens is given, "
            f"got shape {tuple(initial_state.shape)}"
        )
    outputs, finals = [], []
    for i, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        pieces = tuple(t[:, start:end] for t in tensors)
        h0 = None if initial_state is None else initial_state[i : i + 1]
        o, state = fn(*pieces, initial_state=h0, output_final_state=output_final_state, **options)
        outputs.append(o)
        finals.append(state)
    o = torch.cat(outputs, dim=1)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)
