"""Gated attention pooling of a bag of instances (Attention-based Deep Multiple Instance Learning, Ilse et
al., 2018) with the masked hard-instance mining of MHIM-MIL (Multiple Instance Learning Framework with
Masked Hard Instance Mining for Whole Slide Image Classification, Tang et al., 2023).

    a_i = softmax_i( w^T (tanh(V h_i) * sigmoid(U h_i)) ),   z = sum_i a_i h_i

MHIM (official code ``modules/mhim.py``): an EMA teacher scores the instances; the student sees the bag
with the teacher's most-attended instances masked (the top ceil(N * high_ratio / high_keep), of which a
random fraction high_keep is masked, about N * high_ratio in all) plus a random fraction random_ratio of
the rest, and trains on CE + consistency_weight * SoftCE(softmax(z_teacher / tau_t), log_softmax(z / tau_s))
over the bag features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.registry import MechanismSpec, register

from ._checks import check_map, check_positive_int


@dataclass
class GatedAttentionPoolingConfig:
    d_model: int  # instance features
    d_attn: int | None = None  # hidden size of V and U; None: d_model // 2 (at least 1)

    def __post_init__(self):
        check_positive_int("gated_abmil", "d_model", self.d_model)
        if self.d_attn is None:
            self.d_attn = max(1, self.d_model // 2)
        check_positive_int("gated_abmil", "d_attn", self.d_attn)


class GatedAttentionPooling(nn.Module):
    """forward(h (B, N, d_model), keep (B, N) bool or None) -> (z (B, d_model), a (B, N), 0 where masked)."""

    def __init__(self, config: GatedAttentionPoolingConfig):
        super().__init__()
        c = self.config = config
        self.V = nn.Linear(c.d_model, c.d_attn)
        self.U = nn.Linear(c.d_model, c.d_attn)
        self.w = nn.Linear(c.d_attn, 1)

    def scores(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, d_model) -> (B, N) attention logits."""
        return self.w(torch.tanh(self.V(h)) * torch.sigmoid(self.U(h))).squeeze(-1)

    def forward(self, h: torch.Tensor, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        check_map(h, "h", ndim=3, layout="(B, N, d_model)")
        if h.shape[-1] != self.config.d_model:
            raise ValueError(
                f"h must have {self.config.d_model} features (B, N, d_model), got {tuple(h.shape)}"
            )
        logits = self.scores(h).float()  # (B, N)
        if keep is not None:
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != h.shape[:2]:
                got = (
                    f"{keep.dtype} {tuple(keep.shape)}"
                    if isinstance(keep, torch.Tensor)
                    else type(keep).__name__
                )
                raise ValueError(
                    f"keep must be a bool tensor of shape {tuple(h.shape[:2])} (B, N), got {got}"
                )
            if not keep.any(dim=1).all():
                raise ValueError("keep masks every instance of a bag; keep at least one per bag")
            logits = logits.masked_fill(~keep, float("-inf"))
        a = torch.softmax(logits, dim=1)  # (B, N), sums to 1 over the kept instances
        return torch.einsum("bn,bnd->bd", a.to(h.dtype), h), a


def hard_instance_mask(
    teacher_attention: torch.Tensor,
    high_ratio: float = 0.01,
    high_keep: float = 0.5,
    random_ratio: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MHIM's mask: teacher_attention (B, N) -> keep (B, N) bool (True = the student sees the instance).

    The top ceil(N * high_ratio / high_keep) instances by teacher attention are the candidates, of which a
    random fraction ``high_keep`` (rounded) is masked; then a random ``random_ratio`` of the remaining
    instances. At least one instance per bag stays. All ratios 0: nothing is masked."""
    check_map(teacher_attention, "teacher_attention", ndim=2, layout="(B, N)")
    for name, value, low_open in (
        ("high_ratio", high_ratio, False),
        ("random_ratio", random_ratio, False),
        ("high_keep", high_keep, True),
    ):
        if (
            not isinstance(value, int | float)
            or isinstance(value, bool)
            or not (0 < value <= 1 if low_open else 0 <= value < 1)
        ):
            bounds = "(0, 1]" if low_open else "[0, 1)"
            raise ValueError(f"{name} must be a number in {bounds}, got {value!r}")
    B, N = teacher_attention.shape
    device = teacher_attention.device
    keep = torch.ones(B, N, dtype=torch.bool, device=device)
    n_top = min(N - 1, math.ceil(N * high_ratio / high_keep)) if high_ratio > 0 else 0
    n_masked = max(1, round(n_top * high_keep)) if n_top > 0 else 0
    if n_masked:
        top = teacher_attention.topk(n_top, dim=1).indices  # (B, n_top), most attended first
        pick = torch.rand(B, n_top, generator=generator).argsort(dim=1)[:, :n_masked].to(device)
        keep.scatter_(1, top.gather(1, pick), False)
    rest = N - n_masked  # instances each bag still shows
    n_random = min(rest - 1, round(rest * random_ratio))
    if n_random > 0:
        noise = torch.rand(B, N, generator=generator).to(device).masked_fill(~keep, 2.0)  # masked ones last
        keep.scatter_(1, noise.argsort(dim=1)[:, :n_random], False)
    return keep


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (1: frozen)."""
    if not isinstance(momentum, int | float) or not 0 <= momentum <= 1:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    t_params, s_params = dict(teacher.named_parameters()), dict(student.named_parameters())
    if t_params.keys() != s_params.keys():
        raise ValueError("teacher and student must have the same parameters (the teacher is a copy)")
    for name, p in t_params.items():
        p.mul_(momentum).add_(s_params[name].detach(), alpha=1 - momentum)


def consistency_loss(
    teacher_features: torch.Tensor,
    student_features: torch.Tensor,
    tau_teacher: float = 0.1,
    tau_student: float = 1.0,
) -> torch.Tensor:
    """SoftCE(softmax(z_t / tau_t), log_softmax(z_s / tau_s)) over the bag features (B, d), mean over B."""
    if teacher_features.shape != student_features.shape or teacher_features.ndim != 2:
        raise ValueError(
            "teacher_features and student_features must share one shape (B, d), got "
            f"{tuple(teacher_features.shape)} and {tuple(student_features.shape)}"
        )
    target = torch.softmax(teacher_features.detach().float() / tau_teacher, dim=-1)
    return -(target * torch.log_softmax(student_features.float() / tau_student, dim=-1)).sum(-1).mean()


register(
    MechanismSpec(
        key="gated_abmil",
        family="gate",
        config_cls=GatedAttentionPoolingConfig,
        module_cls=GatedAttentionPooling,
        paper="Attention-based Deep Multiple Instance Learning (Ilse et al., 2018); MHIM-MIL (Tang et al., 2023)",
        causal=False,
        notes="gated attention pooling (B, N, d) -> (B, d); MHIM masking: hard_instance_mask, ema_update, "
        "consistency_loss",
        extra={"input": "bag"},
    )
)
