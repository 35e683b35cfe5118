"""gatelab: gated and efficient attention, as drop-in modules with fp32 references and fast paths,
and a lab to train and compare them."""

from gatelab import ops
from gatelab.registry import MechanismSpec, get, list_mechanisms, make_mixer

__version__ = "0.1.0"

__all__ = ["ops", "make_mixer", "list_mechanisms", "get", "MechanismSpec", "__version__"]
