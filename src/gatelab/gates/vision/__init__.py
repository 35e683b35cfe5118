"""Feature-map gates and gated pooling for vision: the additive attention gate of attention-gated U-Nets,
the class-probability self-gate, Feature-Selection / Hard-Attention Gates, gated ABMIL pooling with
MHIM-style masking. Each registers under the registry's "gate" family."""

from .class_prob import ClassProbGate, ClassProbGateConfig
from .feature_selection import FeatureSelectionGate, FeatureSelectionGateConfig
from .grid_attention import GridAttentionGate, GridAttentionGateConfig
from .mil import (
    GatedAttentionPooling,
    GatedAttentionPoolingConfig,
    consistency_loss,
    ema_update,
    hard_instance_mask,
)

__all__ = [
    "ClassProbGate",
    "ClassProbGateConfig",
    "FeatureSelectionGate",
    "FeatureSelectionGateConfig",
    "GatedAttentionPooling",
    "GatedAttentionPoolingConfig",
    "GridAttentionGate",
    "GridAttentionGateConfig",
    "consistency_loss",
    "ema_update",
    "hard_instance_mask",
]
