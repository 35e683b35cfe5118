"""Head and circuit analysis on gatelab LMs and on transformers models patched with gatelab.hf: hooks that
read, patch or ablate per-head outputs, attention, gates and the residual stream, and the methods built on
them (ablation, activation and path patching, direct logit attribution, gate heads, WAAD/FAI,
AttentionInfluence, probes, contrastive attention)."""

from .attention import contrast, contrast_mask, fai, head_groups, mean_backward_distance, waad
from .attribution import direct_logit_attribution, find_gate_heads, gate_values
from .hooks import (
    ModelLayers,
    Site,
    capture,
    hooked,
    layers_of,
    mean_heads,
    plain_softmax,
    replace_all,
    replace_attention,
    replace_heads,
    run_with,
    zero_heads,
)
from .influence import attention_influence, sample_losses, uniform_attention
from .patching import ablate, ablation_scores, activation_patching, path_patching
from .probes import Probe, cliff, fit_probe, probe_accuracy, probe_by_position

__all__ = [
    "Site",
    "ModelLayers",
    "layers_of",
    "hooked",
    "capture",
    "run_with",
    "zero_heads",
    "replace_heads",
    "mean_heads",
    "replace_all",
    "plain_softmax",
    "replace_attention",
    "ablation_scores",
    "ablate",
    "activation_patching",
    "path_patching",
    "direct_logit_attribution",
    "gate_values",
    "find_gate_heads",
    "mean_backward_distance",
    "head_groups",
    "waad",
    "fai",
    "contrast",
    "contrast_mask",
    "uniform_attention",
    "sample_losses",
    "attention_influence",
    "Probe",
    "fit_probe",
    "probe_accuracy",
    "probe_by_position",
    "cliff",
]
