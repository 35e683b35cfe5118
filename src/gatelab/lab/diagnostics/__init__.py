"""Diagnostics of a trained LM: attention sinks, massive activations, kurtosis, W8A8 loss gap, gate
statistics, attention entropy (Gated Attention for Large Language Models, Qiu et al., 2025; Quantizable
Transformers, Bondarenko et al., 2023)."""

from .activations import (
    channel_maxima,
    kurtosis,
    massive_activation_stats,
    sequence_outlier_stats,
    token_kurtosis,
)
from .collect import Collector, diagnose, summarize
from .gates import gate_statistics
from .quant import fake_quantize_int8, lm_loss, w8a8, w8a8_loss
from .sinks import (
    as_distribution,
    attention_entropy,
    first_token_share,
    key_share,
    uniform_entropy,
    uniform_first_token_share,
    uniform_key_share,
)

__all__ = [
    "Collector",
    "as_distribution",
    "attention_entropy",
    "channel_maxima",
    "diagnose",
    "fake_quantize_int8",
    "first_token_share",
    "gate_statistics",
    "key_share",
    "kurtosis",
    "lm_loss",
    "massive_activation_stats",
    "sequence_outlier_stats",
    "summarize",
    "token_kurtosis",
    "uniform_entropy",
    "uniform_first_token_share",
    "uniform_key_share",
    "w8a8",
    "w8a8_loss",
]
