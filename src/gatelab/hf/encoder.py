"""A transformers BERT-family encoder with each self-attention replaced by the gatelab mixer of the same
weights (from_hf_attention), so gatelab.analysis hooks reach its heads; and the loaders the analysis CLI
uses for a checkpoint folder (a causal LM is patched with ``softmax``, an encoder as here)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .convert import from_hf_attention


class EncoderSelfAttention(nn.Module):
    """Stands where BertAttention calls ``self``: the gatelab mixer (q/k/v, bidirectional softmax and the
    output dense as its o_proj); BertSelfOutput's own dense becomes the identity, its residual LayerNorm
    stays.
    Padding is not folded in: an attention mask that hides a key is refused (run unpadded sentences)."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        if attention_mask is not None:
            hidden = attention_mask < 0 if attention_mask.dtype != torch.bool else ~attention_mask
            if bool(hidden.any()):
                raise ValueError(
                    "EncoderSelfAttention takes no padding mask: run sentences one at a time or of one length"
                )
        return self.mixer(hidden_states)[0], None


def patch_encoder(model: nn.Module) -> nn.Module:
    """Replace every BertAttention's self-attention of ``model`` in place (eval mode: dropout is then off, so
    it is dropped). Returns ``model``."""
    found = [m for m in model.modules() if type(m).__name__ == "BertAttention"]
    if not found:
        raise TypeError(f"patch_encoder: {type(model).__name__} has no BertAttention module")
    for module in found:
        mixer = from_hf_attention(module, drop_dropout=True)
        module.self = EncoderSelfAttention(mixer)
        module.output.dense = nn.Identity()
    return model.eval()


def load_for_analysis(path: str | Path):
    """(model, tokenizer, kind) from a local transformers checkpoint (a folder or an alias of
    :data:`gatelab.hf.checkpoint.ALIASES`; never downloaded): a gatelab-patched checkpoint as load_patched
    builds it, any other causal LM patched with ``softmax`` (the same weights), a BERT encoder through
    :func:`patch_encoder`. kind is "causal" or "encoder"."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import resolve_checkpoint
    from .patch import CONFIG_KEY, load_patched, patch

    path = resolve_checkpoint(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if getattr(config, CONFIG_KEY, None):
        return load_patched(path), tokenizer, "causal"
    if any(a.endswith("ForCausalLM") for a in config.architectures or []):
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        return patch(model, "softmax"), tokenizer, "causal"
    return patch_encoder(AutoModel.from_pretrained(path, local_files_only=True)), tokenizer, "encoder"


__all__ = ["EncoderSelfAttention", "patch_encoder", "load_for_analysis"]
