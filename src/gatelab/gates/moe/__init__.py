"""MoE routers (one file each, registering in the ``"gate"`` family with ``extra["role"] == "moe_router"``)
and the MoE MLP that uses any of them in place of an LM's MLP (``LMConfig(mlp="moe:<router>")``)."""

from . import aw_moe, comet, dense_to_sparse, topk  # noqa: F401 (each registers its router)
from ._router import Router, RouterConfig, RouterOutput
from .mlp import MoEMLP, make_router, moe_aux_loss, moe_layers, moe_stats, router_keys

__all__ = [
    "MoEMLP",
    "Router",
    "RouterConfig",
    "RouterOutput",
    "make_router",
    "moe_aux_loss",
    "moe_layers",
    "moe_stats",
    "router_keys",
]
