"""Gated-SwinRMT as a (B, H, W, C) mixer (Gated-SwinRMT, arXiv 2604.06014): RMT's retention with
Manhattan decay inside Swin's shifted windows, a local context enhancement (LCE) on the values, and an
output gate before the output projection.

    o = Retention_h(Retention_w(q, k, v)) + LCE(v)      inside (shifted) windows, decay gamma^(|dx|+|dy|)
    y = W_O(o ⊙ sigmoid(x W_g))                          the G1 gate; gate=False is plain RMT in windows

No public code exists; the form follows the abstract: retention is softmax(Q K^T / sqrt(d) + log D), run
along the width and then along the height of each window (mode="axial", as RMT's decomposed attention) or
once in 2D (mode="full"). The choices the abstract leaves open follow RMT's public code: the per-head decay
log gamma_h = log(1 - 2^-(initial + range * h / heads)) and a 5 x 5 depthwise LCE on the values; RMT's
rotary "theta shift" on q and k is left out. Swin's windows: maps are padded to whole windows, shifted
windows mask across Swin regions, and an axis no longer than the window is one window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.gated_swin_rmt import BACKENDS, MODES, gated_swin_rmt
from gatelab.registry import MechanismSpec, register

from ._base import check_choice, check_positive
from ._vision import VisionConfig, VisionMixer, conv_map, gate_output


@dataclass
class GatedSwinRMTConfig(VisionConfig):
    backends = BACKENDS
    window_size: int = 7
    shift_size: int = 0  # Swin alternates 0 and window_size // 2 between blocks
    mode: str = "axial"  # "axial": width then height (decomposed); "full": one 2D retention per window
    decay_initial: float = 2.0  # gamma_h = 1 - 2^-(decay_initial + decay_range * h / heads), as RMT
    decay_range: float = 4.0
    lce: bool = True  # depthwise conv on the values, added to the retention output
    lce_kernel: int = 5
    gate: bool = True  # the G1 output gate sigmoid(x W_g)
    bias: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.head_dim  # noqa: B018 - d_model must split into heads
        check_positive("window_size", self.window_size)
        if not 0 <= self.shift_size < self.window_size:
            raise ValueError(
                f"shift_size must be in [0, window_size), got {self.shift_size} for {self.window_size}"
            )
        check_choice("mode", self.mode, MODES)
        if self.decay_initial <= 0 or self.decay_range < 0:
            raise ValueError(
                f"decay_initial must be > 0 and decay_range >= 0 (gamma in (0, 1)), got {self.decay_initial}, "
                f"{self.decay_range}"
            )
        check_positive("lce_kernel", self.lce_kernel)
        if self.lce_kernel % 2 == 0:
            raise ValueError(f"lce_kernel must be odd (a centred conv), got {self.lce_kernel}")


def rmt_log_decay(n_heads: int, initial: float, spread: float) -> torch.Tensor:
    """(heads,) log gamma_h = log(1 - 2^-(initial + spread * h / heads)): slow decay in the last heads."""
    return torch.log(
        1 - 2 ** (-initial - spread * torch.arange(n_heads, dtype=torch.float64) / n_heads)
    ).float()


class GatedSwinRMT(VisionMixer):
    config_cls = GatedSwinRMTConfig

    def __init__(self, config: GatedSwinRMTConfig):
        super().__init__(config)
        C = config.d_model
        self.q_proj = nn.Linear(C, C, bias=config.bias)
        self.k_proj = nn.Linear(C, C, bias=config.bias)
        self.v_proj = nn.Linear(C, C, bias=config.bias)
        if config.lce:
            self.lce = nn.Conv2d(C, C, config.lce_kernel, padding=config.lce_kernel // 2, groups=C)
        if config.gate:
            self.gate_proj = nn.Linear(C, C, bias=config.bias)
        self.out_proj = nn.Linear(C, C, bias=config.bias)
        decay = rmt_log_decay(config.n_heads, config.decay_initial, config.decay_range)
        self.register_buffer("log_gamma", decay, persistent=False)

    def _forward(self, x, return_internals):
        c = self.config
        B, H, W, C = x.shape
        q, k, v = (p(x).view(B, H, W, c.n_heads, c.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        o = gated_swin_rmt(
            q, k, v, self.log_gamma, window_size=c.window_size, shift_size=c.shift_size, mode=c.mode,
            backend=c.backend,
        ).reshape(B, H, W, C)  # fmt: skip
        if c.lce:
            o = o + conv_map(self.lce, v.reshape(B, H, W, C))
        internals = {}
        if c.gate:
            o = gate_output(o, torch.sigmoid(self.gate_proj(x)), internals, return_internals)
        return self.out_proj(o), internals


register(
    MechanismSpec(
        key="gated_swin_rmt",
        family="vision",
        config_cls=GatedSwinRMTConfig,
        module_cls=GatedSwinRMT,
        op=gated_swin_rmt,
        backends=BACKENDS,
        causal=False,
        bidirectional=True,
        status="experimental",
        paper="Gated-SwinRMT: shifted-window retention with Manhattan decay and an output gate (arXiv 2604.06014)",
        notes="(B, H, W, C) maps, any H, W; no public code: abstract-level form, RMT's decay and LCE",
        extra={"spatial_dims": 2, "test_options": {"window_size": 4, "shift_size": 2}},
    )
)
