"""Gated linear attention one step at a time with a carried state: the decoding form (Gated Linear Attention
Transformers with Hardware-Efficient Training (Yang et al., 2023))."""

from __future__ import annotations

from gatelab.ops.common.recurrent import token_loop_backend

from .reference import gla_step

# The definition is already a token loop; decoding runs the same steps (gla_step carries the state).
gla_recurrent = token_loop_backend(gla_step, "gla_recurrent")
