"""The bridge to Hugging Face transformers: a gatelab mixer with the same weights as a transformers
attention module (:func:`from_hf_attention`), a pretrained causal LM with its attention replaced by a gatelab
mechanism (:func:`patch`, :func:`load_patched`), and a lab LM saved as a transformers checkpoint
(:func:`export_lm`). transformers (the ``hf`` extra) is imported only when one of these runs."""

from .adapter import HFAttention
from .convert import from_hf_attention
from .export import export_lm
from .patch import load_patched, patch

__all__ = ["from_hf_attention", "patch", "load_patched", "export_lm", "HFAttention"]
