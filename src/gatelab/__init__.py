"""gatelab: gated and efficient attention, as drop-in modules with fp32 references and fast paths,
and a lab to train and compare them."""

from gatelab import _compat, ops
from gatelab.registry import MechanismSpec, get, list_mechanisms, make_mixer

__version__ = "0.2.0"

_compat.install()  # old lab import paths (gatelab.train, gatelab.models, ...) warn and redirect

__all__ = ["ops", "make_mixer", "list_mechanisms", "get", "MechanismSpec", "__version__"]
