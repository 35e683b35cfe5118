"""Linear attention with a fixed per-head decay, one step at a time with a carried state: the decoding
form (TransNormerLLM (Qin et al., 2023); Lightning Attention-2 (Qin et al., 2024))."""

from __future__ import annotations

from gatelab.ops.common.recurrent import token_loop_backend

from .reference import lightning_step, per_token_decay

# The definition is already a token loop; decoding runs the same steps (lightning_step carries the state).
lightning_recurrent = token_loop_backend(lightning_step, "lightning_recurrent", per_token_decay)
