"""Token-by-token linear attention: the state a recurrence starts from and the loop over a one-token step,
shared by the reference and recurrent (decoding) backends."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch


def initial_or_zeros(initial_state: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``initial_state`` (B, H, K, V) in fp32, or fp32 zeros of that shape for q (B, T, H, K) and
    v (B, T, H, V)."""
    if initial_state is not None:
        return initial_state.float()
    B, _, H, K = q.shape
    return q.new_zeros(B, H, K, v.shape[-1], dtype=torch.float32)


def run_steps(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *gates: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_t, S_t = step(S_{t-1}, q_t, k_t, v_t, *gates_t, scale) for t = 1 .. T.

    q, k (B, T, H, K); v (B, T, H, V); gates (B, T, H, ...) indexed along T like them; initial_state
    (B, H, K, V) or None (zeros). Returns o (B, T, H, V) in q's dtype and the final state (B, H, K, V)
    fp32, or None unless ``output_final_state``.
    """
    state = initial_or_zeros(initial_state, q, v)
    outputs = []
    for t in range(q.shape[1]):
        o, state = step(state, q[:, t], k[:, t], v[:, t], *(x[:, t] for x in gates), scale)
        outputs.append(o)
    o = torch.stack(outputs, dim=1).to(q.dtype)  # (B, T, H, V)
    return o, (state if output_final_state else None)


def token_loop_backend(
    step: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    name: str,
    prepare: Callable[..., tuple[torch.Tensor, ...]] | None = None,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """A token-loop backend of a linear op from its one-token ``step(state, q, k, v, *gates, scale)`` (see
    :func:`run_steps`): ``name(q, k, v, *gates, *, scale=None, initial_state=None, output_final_state=False)``
    with the gates named as in the step, so they can be passed by keyword too; scale defaults to
    K ** -0.5 and ``prepare(q, *gates)`` returns the gates indexed along T (e.g. a per-head decay
    expanded)."""
    gates = list(inspect.signature(step).parameters)[4:-1]
    keyword = inspect.Parameter.KEYWORD_ONLY
    signature = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("q", "k", "v", *gates)]
        + [inspect.Parameter(n, keyword, default=d) for n, d in (("scale", None), ("initial_state", None))]
        + [inspect.Parameter("output_final_state", keyword, default=False)]
    )

    def backend(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)  # a TypeError names a missing or unknown argument
        bound.apply_defaults()
        x = bound.arguments
        q, scale = x["q"], x["scale"]
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        tensors = [x[n] for n in gates]
        tensors = tensors if prepare is None else prepare(q, *tensors)
        return run_steps(
            step, q, x["k"], x["v"], *tensors, scale=scale, initial_state=x["initial_state"],
            output_final_state=x["output_final_state"],
        )  # fmt: skip

    backend.__name__ = backend.__qualname__ = name
    backend.__signature__ = signature
    backend.__doc__ = f"Run :func:`{step.__name__}` over T in fp32; arguments and shapes as the op's."
    return backend


__all__ = ["initial_or_zeros", "run_steps", "token_loop_backend"]
