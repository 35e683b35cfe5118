"""Neighborhood attention mixer for 1D/2D/3D maps (Generalized Neighborhood Attention: Multi-dimensional
Sparse Attention at the Speed of Light, Hassani et al., 2025): each token attends to its kernel-sized
neighbourhood (plus optional learned global tokens). Vision maps go in as (B, H, W, C); with spatial_dims=1
and causal=True it is a causal sequence mixer for LMs (stride 1), decoding with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from gatelab.ops.common.rope import apply_rope, rope_frequencies
from gatelab.ops.neighborhood import BACKENDS, full_mask, neighborhood, neighborhood_probs, visible_1d
from gatelab.ops.neighborhood.reference import neighborhood_reference, neighborhood_sdpa
from gatelab.registry import MechanismSpec, register

from ._base import HeadsConfig, Mixer, check_input
from ._kv_cache import PLAIN_CACHE


@dataclass
class NeighborhoodConfig(HeadsConfig):
    causal: bool = False  # vision default; per-dim causal is available through the op
    spatial_dims: int = 2  # 1 (sequence), 2 (image, (B, H, W, C)), 3 (video, (B, T, H, W, C))
    kernel_size: int | tuple[int, ...] = 7
    stride: int | tuple[int, ...] = 1
    dilation: int | tuple[int, ...] = 1
    n_global: int = 0  # learned global tokens every query also attends to (NATTEN's additional keys)
    qk_norm: bool = False
    rope: bool = False  # rotary positions, for spatial_dims=1 only
    rope_base: float = 10000.0
    bias: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {self.spatial_dims!r}")
        for name in ("kernel_size", "stride", "dilation"):
            value = getattr(self, name)
            values = value if isinstance(value, tuple | list) else (value,) * self.spatial_dims
            if len(values) != self.spatial_dims or any(
                not isinstance(v, int) or isinstance(v, bool) or v < 1 for v in values
            ):
                raise ValueError(
                    f"{name} must be a positive int or {self.spatial_dims} of them, got {value!r}"
                )
            setattr(self, name, tuple(values))
        if any(s > k for s, k in zip(self.stride, self.kernel_size)):
            raise ValueError(
                f"stride cannot be larger than kernel_size, got {self.stride} and {self.kernel_size}"
            )
        if not isinstance(self.n_global, int) or self.n_global < 0:
            raise ValueError(f"n_global must be an int >= 0, got {self.n_global!r}")
        if self.rope and self.spatial_dims != 1:
            raise ValueError(
                "rope is for spatial_dims=1; 2D/3D maps take their positions from the neighbourhood"
            )
        if self.causal and self.spatial_dims == 1 and self.stride != (1,):
            # with a stride, a causal window depends on where the sequence ends, so decoding would drift
            raise ValueError(f"a causal 1D neighborhood mixer needs stride 1, got {self.stride}")
        if self.causal and self.spatial_dims == 1 and self.backend not in ("auto", "reference", "sdpa"):
            raise ValueError(
                f"a causal 1D neighborhood mixer runs on 'reference' or 'sdpa', got {self.backend!r}"
            )

    @property
    def sequence(self) -> bool:
        """A causal 1D mixer: any length, decodes with a KV cache."""
        return self.spatial_dims == 1 and self.causal


class NeighborhoodAttention(Mixer):
    config_cls = NeighborhoodConfig

    def __init__(self, config: NeighborhoodConfig):
        super().__init__(config)
        c = config
        H, Hkv, D = c.n_heads, c.kv_heads, c.dim
        self.q_proj = nn.Linear(c.d_model, H * D, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, Hkv * D, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, Hkv * D, bias=c.bias)
        self.o_proj = nn.Linear(H * D, c.d_model, bias=c.bias)
        if c.qk_norm:
            self.q_norm = nn.RMSNorm(D, eps=1e-6)
            self.k_norm = nn.RMSNorm(D, eps=1e-6)
        if c.n_global:
            self.global_tokens = nn.Parameter(torch.randn(c.n_global, c.d_model) * 0.02)
        if c.rope:
            self.register_buffer("inv_freq", rope_frequencies(D, c.rope_base), persistent=False)

    def forward(self, x: torch.Tensor, state=None, *, return_internals: bool = False):
        c = self.config
        layout = "(B, T, d_model)" if c.spatial_dims == 1 else f"(B, *{c.spatial_dims} spatial dims, d_model)"
        check_input(x, c.d_model, c.spatial_dims, layout)
        if state is not None and not c.sequence:
            raise ValueError("a state (decoding) needs a causal 1D mixer (spatial_dims=1, causal=True)")
        y, state, internals = self._forward(x, state, return_internals)
        return (y, state, internals) if return_internals else (y, state)

    def _project(self, x):
        c = self.config
        lead = x.shape[:-1]  # (B, *spatial)
        q = self.q_proj(x).view(*lead, c.n_heads, c.dim)  # (B, *spatial, H, D)
        k = self.k_proj(x).view(*lead, c.kv_heads, c.dim)  # (B, *spatial, Hkv, D)
        v = self.v_proj(x).view(*lead, c.kv_heads, c.dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        extra_k = extra_v = None
        if c.n_global:
            B = x.shape[0]
            extra_k = (
                self.k_proj(self.global_tokens).view(1, c.n_global, c.kv_heads, c.dim).expand(B, -1, -1, -1)
            )
            extra_v = (
                self.v_proj(self.global_tokens).view(1, c.n_global, c.kv_heads, c.dim).expand(B, -1, -1, -1)
            )
            if c.qk_norm:
                extra_k = self.k_norm(extra_k)
        return q, k, v, extra_k, extra_v

    def _forward(self, x, state, return_internals):
        c = self.config
        q, k, v, extra_k, extra_v = self._project(x)
        if c.sequence:
            o, cache, internals = self._attend_sequence(q, k, v, extra_k, extra_v, state, return_internals)
        else:
            cache = None
            o = neighborhood(
                q, k, v, kernel_size=c.kernel_size, stride=c.stride, dilation=c.dilation, causal=c.causal,
                additional_keys=extra_k, additional_values=extra_v, backend=c.backend,
            )  # fmt: skip
            internals = {}
            if return_internals:
                spatial = tuple(x.shape[1:-1])
                n_extra = 0 if extra_k is None else c.n_global
                causal = (c.causal,) * c.spatial_dims
                mask = full_mask(spatial, c.kernel_size, c.stride, c.dilation, causal, n_extra, x.device)
                kf = k.flatten(1, c.spatial_dims)
                kf = kf if extra_k is None else torch.cat([kf, extra_k], dim=1)
                internals["attn"] = neighborhood_probs(q.flatten(1, c.spatial_dims), kf, mask, c.dim**-0.5)
        y = self.o_proj(o.reshape(*x.shape[:-1], -1))
        return y, cache, internals

    def _attend_sequence(self, q, k, v, extra_k, extra_v, state, want_internals):
        """Causal 1D: keys in (p - kernel * dilation, p] of the query's dilation group, any length."""
        c = self.config
        B, T = q.shape[:2]
        PLAIN_CACHE.check_state(self, state, B)
        start = 0 if state is None else state.length
        positions = torch.arange(start, start + T, device=q.device)
        if c.rope:
            q, k = apply_rope(q, positions, self.inv_freq), apply_rope(k, positions, self.inv_freq)
        cache, q, keys, values = PLAIN_CACHE.update(self, state, q, k, v, None, positions)
        S = keys.shape[1]
        pos_q = torch.arange(S - T, S, device=q.device)[:, None]
        pos_k = torch.arange(S, device=q.device)[None, :]
        mask = visible_1d(pos_q, pos_k, S, c.kernel_size[0], 1, c.dilation[0], True)  # (T, S)
        if extra_k is not None:
            keys, values = torch.cat([keys, extra_k], dim=1), torch.cat([values, extra_v], dim=1)
            mask = torch.cat([mask, mask.new_ones(T, c.n_global)], dim=1)
        fn = neighborhood_reference if c.backend == "reference" else neighborhood_sdpa
        o = fn(q, keys, values, mask, c.dim**-0.5)  # (B, T, H, D)
        internals = {"attn": neighborhood_probs(q, keys, mask, c.dim**-0.5)} if want_internals else {}
        return o, cache, internals

    def reset_parameters(self, std: float = 0.02, n_layers: int = 1) -> None:
        for lin in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.o_proj.weight, std=std / (2 * n_layers) ** 0.5)


register(
    MechanismSpec(
        key="neighborhood",
        family="sparse",
        config_cls=NeighborhoodConfig,
        module_cls=NeighborhoodAttention,
        op=neighborhood,
        backends=BACKENDS,
        causal=False,
        bidirectional=True,
        paper="Generalized Neighborhood Attention: Multi-dimensional Sparse Attention at the Speed of Light "
        "(Hassani et al., 2025)",
        notes="vision maps (B, H, W, C); spatial_dims=1, causal=True gives a causal LM mixer with a KV cache",
        extra={"spatial_dims": 2, "test_options": {"kernel_size": 3, "n_global": 1}},
    )
)
