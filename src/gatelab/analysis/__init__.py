"""Head and circuit analysis on gatelab LMs and on transformers models patched with gatelab.hf: hooks that
read, patch or ablate per-head outputs, attention, gates and the residual stream, and the methods built on
them (ablation, activation and path patching, direct logit attribution, gate heads, WAAD/FAI,
AttentionInfluence, probes, contrastive attention)."""

# each module's __all__ lists its public names once; the package re-exports them and its __all__ is their union
from . import attention, attribution, hooks, influence, patching, probes
from .attention import *  # noqa: F403
from .attribution import *  # noqa: F403
from .hooks import *  # noqa: F403
from .influence import *  # noqa: F403
from .patching import *  # noqa: F403
from .probes import *  # noqa: F403

__all__ = [
    *hooks.__all__,
    *patching.__all__,
    *attribution.__all__,
    *attention.__all__,
    *influence.__all__,
    *probes.__all__,
]
