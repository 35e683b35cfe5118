"""The lab's small vision backbones, in which each feature-map gate (``gatelab.gates.vision``) or vision
mixer drops in: a two-stage CNN for classification, a U-Net with one skip for segmentation, and a ViT-like
stack of pre-norm blocks on the pixel map where any registered bidirectional (B, H, W, C) mixer is the
token mixer. The interface is the LM's: ``model(images)[0]`` is (B, T, classes) logits (T = 1 for a
classification, H * W for a segmentation), so the one trainer trains them with cross-entropy.

``block``: "cnn" (the plain CNN / U-Net), a vision gate key, or a mixer key (built by the registry with
d_model, n_heads and ``block_options``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.gates.vision import (
    ClassProbGate,
    ClassProbGateConfig,
    FeatureSelectionGate,
    FeatureSelectionGateConfig,
    GatedAttentionPooling,
    GatedAttentionPoolingConfig,
    GridAttentionGate,
    GridAttentionGateConfig,
)
from gatelab.lab.train.routing import GATE_LR
from gatelab.registry import get, list_mechanisms, make_mixer

PLAIN = "cnn"
CLASSIFY_GATES = ("feature_selection_gate", "grid_attention_gate", "class_prob_gate", "gated_abmil")
SEGMENT_GATES = ("feature_selection_gate", "grid_attention_gate", "class_prob_gate")  # pooling has no map
MODEL_FILES = ("model.safetensors", "config.json")


def map_mixers() -> list[str]:
    """Registered mixers that take (B, H, W, C) maps without a causal mask, sorted."""
    return sorted(
        s.key
        for s in list_mechanisms()
        if s.bidirectional and s.family != "gate" and s.extra.get("spatial_dims") == 2
    )


def vision_blocks(segment: bool) -> list[str]:
    """Every block the backbone takes for a classification (or, ``segment``, a segmentation) task."""
    return [PLAIN, *(SEGMENT_GATES if segment else CLASSIFY_GATES), *map_mixers()]


def check_block(block: str, segment: bool) -> None:
    """A clear error for a block the backbone cannot take on this kind of task."""
    known = vision_blocks(segment)
    if block not in known:
        get(block) if block != PLAIN else None  # an unknown key: the registry's error lists the known ones
        what = "segmentation" if segment else "classification"
        raise ValueError(
            f"{block!r} does not drop into the vision backbone for {what}; choose one of {', '.join(known)}"
        )


@dataclass
class VisionConfig:
    n_classes: int  # classes per output position (segmentation: the background included)
    image_size: int  # the square input's side
    segment: bool = False  # per-pixel logits (U-Net) instead of one per image
    block: str = PLAIN
    block_options: dict = field(default_factory=dict)  # the mixer's options (make_mixer), or the gate's
    d_model: int = 32  # channels of the first CNN stage; width of the ViT
    n_layers: int = 2  # ViT blocks (the CNNs have two stages)
    n_heads: int = 4
    mlp_ratio: float = 2.0
    routing_lr: float | None = GATE_LR  # feature_selection_gate: Gradient Routing's gate lr; None: no routing
    seed: int | None = None  # if set, the init is reproducible regardless of the global RNG

    def __post_init__(self):
        for name in ("n_classes", "image_size", "d_model", "n_layers", "n_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.block_options, dict):
            raise TypeError(f"block_options must be a dict, got {self.block_options!r}")
        check_block(self.block, self.segment)
        if self.block in CLASSIFY_GATES and self.block_options:
            raise ValueError(
                f"{self.block} in the backbone takes no options (its sizes follow d_model), got {self.block_options}"
            )
        if self.routing_lr is not None and (
            not isinstance(self.routing_lr, int | float) or not self.routing_lr > 0
        ):
            raise ValueError(f"routing_lr must be a number > 0 or None, got {self.routing_lr!r}")

    @property
    def vocab_size(self) -> int:  # the trainer's memory estimate reads the output width under this name
        return self.n_classes

    @property
    def kind(self) -> str:
        return "mixer" if self.block in map_mixers() else "cnn"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1), nn.ReLU()
    )


class ConvNet(nn.Module):
    """Two stages, 8x8 -> 4x4 (c, then 2c channels), pooled to one vector; the gate where its paper puts it:
    FSG after each stage, the additive gate on stage 1 with stage 2 as gating signal (pooled beside it,
    as the attention-gated Sononet), the class-probability gate on stage 2, gated ABMIL over stage 2's
    positions as instances."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        d, block = c.d_model, c.block
        self.block = block
        self.stage1, self.stage2 = conv_block(1, d), conv_block(d, 2 * d)
        width = 2 * d
        if block == "feature_selection_gate":
            self.fsg1 = FeatureSelectionGate(FeatureSelectionGateConfig(d))
            self.fsg2 = FeatureSelectionGate(FeatureSelectionGateConfig(2 * d))
        elif block == "grid_attention_gate":
            self.gate = GridAttentionGate(GridAttentionGateConfig(d, 2 * d))
            width = 3 * d
        elif block == "class_prob_gate":
            self.gate = ClassProbGate(ClassProbGateConfig(2 * d, c.n_classes + 1))  # + "no digit here"
        elif block == "gated_abmil":
            self.pool = GatedAttentionPooling(GatedAttentionPoolingConfig(2 * d))
        self.head = nn.Linear(width, c.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S) -> logits (B, 1, n_classes)."""
        f1 = self.stage1(x)  # (B, d, S, S)
        if self.block == "feature_selection_gate":
            f1 = self.fsg1(f1)
        f2 = self.stage2(F.max_pool2d(f1, 2))  # (B, 2d, S/2, S/2)
        if self.block == "feature_selection_gate":
            f2 = self.fsg2(f2)
        if self.block == "grid_attention_gate":
            gated, _ = self.gate(f1, f2)
            z = torch.cat([gated.mean(dim=(2, 3)), f2.mean(dim=(2, 3))], dim=1)  # (B, 3d)
        elif self.block == "class_prob_gate":
            z = self.gate(f2)[0].mean(dim=(2, 3))
        elif self.block == "gated_abmil":
            z = self.pool(f2.flatten(2).transpose(1, 2))[0]  # instances: the (S/2)^2 positions
        else:
            z = f2.mean(dim=(2, 3))  # (B, 2d)
        return self.head(z)[:, None]


class UNet(nn.Module):
    """Encoder S -> S/2 (c, 2c channels), decoder back to S with the one skip; the gate where its paper puts
    it: the additive gate on the skip with the coarse features as gating signal, the class-probability
    gate on the decoder's features, FSG on the skip and the bottleneck."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        d, block = c.d_model, c.block
        self.block = block
        self.enc1, self.enc2 = conv_block(1, d), conv_block(d, 2 * d)
        self.up = nn.Conv2d(2 * d, d, 1)
        self.dec = conv_block(2 * d, d)
        if block == "feature_selection_gate":
            self.fsg1 = FeatureSelectionGate(FeatureSelectionGateConfig(d))
            self.fsg2 = FeatureSelectionGate(FeatureSelectionGateConfig(2 * d))
        elif block == "grid_attention_gate":
            self.gate = GridAttentionGate(GridAttentionGateConfig(d, 2 * d))
        elif block == "class_prob_gate":
            self.gate = ClassProbGate(ClassProbGateConfig(d, c.n_classes))
        self.head = nn.Conv2d(d, c.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S) -> logits (B, S * S, n_classes)."""
        skip = self.enc1(x)  # (B, d, S, S)
        coarse = self.enc2(F.max_pool2d(skip, 2))  # (B, 2d, S/2, S/2)
        if self.block == "feature_selection_gate":
            skip, coarse = self.fsg1(skip), self.fsg2(coarse)
        elif self.block == "grid_attention_gate":
            skip, _ = self.gate(skip, coarse)
        up = self.up(F.interpolate(coarse, size=skip.shape[2:], mode="bilinear", align_corners=False))
        h = self.dec(torch.cat([up, skip], dim=1))  # (B, d, S, S)
        if self.block == "class_prob_gate":
            h = self.gate(h)[0]
        return self.head(h).flatten(2).transpose(1, 2)  # (B, S * S, n_classes)


def backbone_options(key: str, image_size: int) -> dict:
    """What the backbone tells a mixer about its map: a mixer fixed to one map size (NiNformer's token MLP
    has H * W inputs) gets the backbone's ``map_size``; others get nothing."""
    if "map_size" in {f.name for f in dataclasses.fields(get(key).config_cls)}:
        return {"map_size": (image_size, image_size)}
    return {}


class MixerNet(nn.Module):
    """A ViT-like stack on the pixel map: 3x3 conv stem to d_model, learned positions, pre-norm blocks
    (x + mixer(LN x), x + MLP(LN x)) with the registered mixer, then a mean-pooled or per-pixel head."""

    def __init__(self, c: VisionConfig):
        super().__init__()
        d, S = c.d_model, c.image_size
        self.segment = c.segment
        self.stem = nn.Conv2d(1, d, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, S, S, d) * 0.02)
        hidden = max(1, round(c.mlp_ratio * d))
        self.norms1 = nn.ModuleList(nn.LayerNorm(d) for _ in range(c.n_layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(d) for _ in range(c.n_layers))
        options = {"d_model": d, "n_heads": c.n_heads, **backbone_options(c.block, S), **c.block_options}
        self.mixers = nn.ModuleList(make_mixer(c.block, **options) for _ in range(c.n_layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)) for _ in range(c.n_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, c.n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, S, S) -> logits (B, 1, n_classes), or (B, S * S, n_classes) when segmenting."""
        h = self.stem(x).permute(0, 2, 3, 1) + self.pos  # (B, S, S, d)
        for norm1, mixer, norm2, mlp in zip(self.norms1, self.mixers, self.norms2, self.mlps):
            h = h + mixer(norm1(h))[0]
            h = h + mlp(norm2(h))
        h = self.norm(h)
        if self.segment:
            return self.head(h).flatten(1, 2)  # (B, S * S, n_classes)
        return self.head(h.mean(dim=(1, 2)))[:, None]  # (B, 1, n_classes)


class VisionModel(nn.Module):
    """``forward(images (B, 1, S, S) float) -> (logits (B, T, n_classes), None)``: the LM's interface."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        if not isinstance(config, VisionConfig):
            raise TypeError(f"VisionModel takes a VisionConfig, got {type(config).__name__}")
        self.config = config
        self.layer_keys = [config.block]
        with torch.random.fork_rng(enabled=config.seed is not None, devices=[]):
            if config.seed is not None:
                torch.manual_seed(config.seed)
            if config.kind == "mixer":
                self.net = MixerNet(config)
            else:
                self.net = UNet(config) if config.segment else ConvNet(config)

    @property
    def gradient_routing_lr(self) -> float | None:
        """The gate lr of Gradient Routing when this model trains with it (FSG gates), else None."""
        return self.config.routing_lr if self.config.block == "feature_selection_gate" else None

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, images: torch.Tensor, states=None):
        S = self.config.image_size
        if not isinstance(images, torch.Tensor) or not images.dtype.is_floating_point:
            got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
            raise TypeError(f"images must be a floating-point tensor (B, 1, {S}, {S}), got {got}")
        if images.ndim != 4 or tuple(images.shape[1:]) != (1, S, S) or images.shape[0] == 0:
            raise ValueError(
                f"images must have shape (B, 1, {S}, {S}) with B >= 1, got {tuple(images.shape)}"
            )
        if states is not None:
            raise ValueError("a vision model keeps no state between calls; pass states=None")
        return self.net(images), None

    def save(self, path_dir: str | Path) -> None:
        """``model.safetensors``, ``config.json`` and their ``manifest.json`` in ``path_dir`` (atomic writes)."""
        from safetensors.torch import save

        from gatelab.lab.rundir import atomic_write_bytes, atomic_write_text, write_manifest

        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(path / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        atomic_write_text(path / "config.json", json.dumps(self.config.to_dict(), indent=2))
        write_manifest(path, MODEL_FILES)
