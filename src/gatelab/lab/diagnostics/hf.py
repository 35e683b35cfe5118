"""The lab's diagnostics on a local transformers checkpoint (``gatelab inspect --hf``): first-token and
special-token attention share per layer and head, massive activations and the channels they sit in,
kurtosis, the per-block infinity norm and kurtosis of Quantizable Transformers (Bondarenko et al., 2023),
the W8A8 gap and gate statistics where the model holds gatelab mixers.

The model's own attention probabilities come from ``attn_implementation="eager"`` with
``output_attentions=True``; everything else is read by forward hooks on each layer, so no modelling code
is copied. Encoders (BERT-like) are scored with a masked-LM loss, decoders with the next-token loss; a
checkpoint without an LM head (a sentence-embedding model) has no loss, and its W8A8 damage is measured on
its last hidden state instead (relative error, and the cosine of mean-pooled sentence embeddings).
transformers is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import ast
import hashlib
import math

import torch
import torch.nn as nn

from gatelab.hf.checkpoint import Checkpoint
from gatelab.lab.diagnostics import Collector, channel_maxima, key_share, lm_loss, summarize, w8a8
from gatelab.mixers._base import Mixer

# Quantizable Transformers hook each layer's output, its norms and the projections that write into the
# residual stream (attention out_proj, FFN fc2); these are those projections' names across the families
OUTPUT_PROJECTIONS = ("o_proj", "out_proj", "down_proj", "fc2", "c_proj", "dense_4h_to_h", "wo")
MLM_PROBABILITY = 0.15
TOP_DIMS = 3


def default_text(min_chars: int) -> tuple[str, str]:
    """English prose that ships with Python: the module docstrings of the standard library's ``.py``
    files, in sorted order of their paths, until ``min_chars`` characters. Returns (text, source)."""
    from gatelab.lab.tasks.text import _select_files, stdlib_dir

    parts, total = [], 0
    for path in _select_files(stdlib_dir(), ".py"):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8", errors="replace")))
        except (SyntaxError, ValueError):
            continue
        if doc and len(doc) > 200:  # one-liners are mostly titles, not sentences
            parts.append(doc)
            total += len(doc)
        if total >= min_chars:
            break
    return "\n\n".join(parts), f"python-stdlib module docstrings: {stdlib_dir()}"


def token_windows(tokenizer, text: str, kind: str, seq_len: int, n_sequences: int) -> torch.Tensor:
    """(n_sequences, seq_len) long: consecutive pieces of ``text``, framed as the model was trained:
    [CLS] piece [SEP] for an encoder, [BOS] piece for a decoder whose tokenizer has a BOS token. No padding,
    so every position is a real token and no attention mask is needed."""
    if kind == "encoder":
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
            raise ValueError("an encoder's tokenizer needs a [CLS] and a [SEP] token to frame the windows")
        prefix, suffix = [tokenizer.cls_token_id], [tokenizer.sep_token_id]
    else:
        prefix, suffix = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []), []
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise ValueError(f"--seq-len must leave room for text between the special tokens, got {seq_len}")
    ids: list[int] = []
    for paragraph in text.split("\n\n"):
        if paragraph.strip():
            ids += tokenizer(paragraph, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < body * n_sequences:
        raise ValueError(
            f"the text holds {len(ids)} tokens; {n_sequences} sequences of {seq_len} tokens need "
            f"{body * n_sequences}: give a longer --text or fewer --batches / --batch-size / --seq-len"
        )
    rows = [prefix + ids[i * body : (i + 1) * body] + suffix for i in range(n_sequences)]
    return torch.tensor(rows, dtype=torch.long)


def loss_batches(
    windows: torch.Tensor, checkpoint: Checkpoint, batch_size: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) per batch for lm_loss: the next token for a decoder; for an encoder, 15% of the
    non-special positions (at least one per sequence) replaced by [MASK] and predicted (all replaced, none
    kept or randomised as BERT's 80/10/10 does: the loss is a fixed probe, not a training signal)."""
    tokenizer = checkpoint.tokenizer
    if checkpoint.kind == "decoder":
        targets = torch.cat([windows[:, 1:], torch.full_like(windows[:, :1], -100)], dim=1)
        inputs = windows
    else:
        if tokenizer.mask_token_id is None:
            raise ValueError("a masked-LM loss needs a [MASK] token, and this tokenizer has none")
        special = torch.isin(windows, torch.tensor(tokenizer.all_special_ids))
        generator = torch.Generator().manual_seed(seed)
        chosen = (torch.rand(windows.shape, generator=generator) < MLM_PROBABILITY) & ~special
        first_plain = (~special).float().argmax(dim=1)  # a sequence with nothing chosen predicts one token
        chosen[torch.arange(len(windows)), first_plain] |= ~chosen.any(dim=1)
        inputs = windows.masked_fill(chosen, tokenizer.mask_token_id)
        targets = windows.masked_fill(~chosen, -100)
    return [
        (inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(windows), batch_size)
    ]


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer layers: the first ModuleList as long as config.num_hidden_layers."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise ValueError(f"unsupported architecture {type(model).__name__}: no list of its {n} layers found")


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


class _Hooks:
    """Forward hooks on every layer: h_0 (the first layer's input), each layer's output, the outputs of its
    norms and residual-writing projections (the modules Quantizable Transformers hook), and the internals
    of any gatelab mixer inside it (asked for with return_internals=True, handed back without them)."""

    def __init__(self, layers: nn.ModuleList, hidden_size: int):
        self.hidden_size, self.handles = hidden_size, []
        self.reset()
        self.handles.append(layers[0].register_forward_pre_hook(self._input, with_kwargs=True))
        for j, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._store(j, "layer")))
            for name, module in layer.named_modules():
                leaf = name.rsplit(".", 1)[-1]
                is_norm = type(module).__name__.endswith("Norm")
                is_projection = leaf in OUTPUT_PROJECTIONS or name.endswith("output.dense")  # any class
                if name and (is_norm or is_projection):
                    self.handles.append(module.register_forward_hook(self._store(j, name)))
                if isinstance(module, Mixer):
                    self.handles.append(
                        module.register_forward_pre_hook(self._ask_internals, with_kwargs=True)
                    )
                    self.handles.append(
                        module.register_forward_hook(self._take_internals(j), with_kwargs=True)
                    )

    def reset(self) -> None:
        self.h0, self.outputs, self.mixers, self.asked = None, {}, {}, set()

    def _input(self, _module, args, kwargs):
        self.h0 = args[0] if args else kwargs.get("hidden_states")

    def _store(self, j: int, name: str):
        def hook(_module, _args, output):
            out = _first(output)
            if isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[-1] == self.hidden_size:
                self.outputs.setdefault(j, {})[name] = out  # not detached: block_outputs compares identity

        return hook

    def _ask_internals(self, module, args, kwargs):
        if kwargs.get("return_internals"):
            return None  # the caller wants them itself: leave its output as it is
        self.asked.add(id(module))
        return args, {**kwargs, "return_internals": True}

    def _take_internals(self, j: int):
        def hook(module, _args, _kwargs, output):
            self.mixers[j] = output[2]
            if id(module) in self.asked:
                self.asked.discard(id(module))
                return output[:2]  # what the caller asked for: (y, state)
            return output

        return hook

    def block_outputs(self, n_layers: int) -> list[dict[str, torch.Tensor]]:
        """Per layer, module name -> (B, T, d) output; "layer" dropped where it is the very tensor a norm
        returned (a post-norm block such as BERT's), so no module is counted twice."""
        blocks = []
        for j in range(n_layers):
            outs = dict(self.outputs.get(j, {}))
            layer = outs.get("layer")
            if layer is not None and any(v is layer for k, v in outs.items() if k != "layer"):
                del outs["layer"]
            blocks.append(outs)
        return blocks

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def diagnose_hf(
    checkpoint: Checkpoint,
    windows: torch.Tensor,
    batch_size: int,
    *,
    quantization: bool = True,
    seed: int = 0,
) -> dict:
    """Every diagnostic of ``checkpoint`` on the token ``windows`` (N, T), in batches of ``batch_size``.

    Returns the dict :func:`gatelab.lab.diagnostics.diagnose` returns (per layer: sink share per head,
    entropy, max activation, kurtosis, block inf-norm and kurtosis, gates) plus "special_share" (per
    special token: per layer, per head), "top_dims" (per hidden state: the channels with the largest
    |activation| and the token each sits on), the W8A8 figures and a "model" / "summary" record.
    """
    if (
        not isinstance(windows, torch.Tensor)
        or windows.ndim != 2
        or windows.dtype != torch.long
        or not len(windows)
    ):
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be token ids of shape (N, T), long, N >= 1, got {shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    model = checkpoint.model
    was_training = model.training
    model.eval()  # no dropout in what is measured
    try:
        return _diagnose(checkpoint, windows, batch_size, quantization=quantization, seed=seed)
    finally:
        model.train(was_training)


@torch.no_grad()
def _diagnose(checkpoint: Checkpoint, windows: torch.Tensor, batch_size: int, *, quantization: bool = True,
                seed: int = 0) -> dict:  # fmt: skip
    """:func:`diagnose_hf` with the model in eval mode."""
    model, tokenizer = checkpoint.model, checkpoint.tokenizer
    device = next(model.parameters()).device
    layers_name, layers = find_layers(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hooks = _Hooks(layers, config.hidden_size)
    collector = Collector(causal=checkpoint.causal)
    special_ids = sorted({i for i in tokenizer.all_special_ids if bool((windows == i).any())})
    special_sum: dict[int, list] = {i: [None] * len(layers) for i in special_ids}
    uniform_sum = dict.fromkeys(special_ids, 0.0)
    channel_max: dict = {}  # j -> (values, where) of h_j; (j, module) -> the same of a hooked module
    last_fp32: list[torch.Tensor] = []
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    try:
        for b, ids in enumerate(batches):
            hooks.reset()
            out = model(input_ids=ids.to(device), output_attentions=True)
            blocks = hooks.block_outputs(len(layers))
            mixers = _layer_internals(model, out, hooks, len(layers))
            hidden = [hooks.h0] + [hooks.outputs[j]["layer"] for j in range(len(layers))]
            collector.add(hidden, blocks, mixers)
            last_fp32.append(hidden[-1].float().cpu())
            _add_special_shares(special_sum, uniform_sum, mixers, ids, checkpoint.causal)
            tensors = {j: h for j, h in enumerate(hidden)}
            tensors.update({(j, name): t for j, outs in enumerate(blocks) for name, t in outs.items()})
            _add_channel_maxima(channel_max, tensors, ids, b * batch_size)
    finally:
        hooks.remove()
    n = len(windows)
    result = collector.result([type(layer).__name__ for layer in layers])
    names = tokenizer.convert_ids_to_tokens(special_ids)
    result["special_share"] = {
        name: [None if s is None else (s / n).tolist() for s in special_sum[i]]
        for name, i in zip(names, special_ids)
    }
    result["special_share_layer"] = {
        name: [None if h is None else sum(h) / len(h) for h in per_layer]
        for name, per_layer in result["special_share"].items()
    }
    result["special_share_uniform"] = {name: uniform_sum[i] / n for name, i in zip(names, special_ids)}
    result["top_dims"] = [_top_dims(channel_max[j], windows, tokenizer) for j in range(len(layers) + 1)]
    result["module_top_dims"] = [
        {name: _top_dims(channel_max[(j, name)], windows, tokenizer)[:1] for name in result["modules"][j]}
        for j in range(len(layers))
    ]
    if bool((windows[:, 0] == windows[0, 0]).all()):  # framed windows: the sink column names its token
        result["first_token"] = tokenizer.convert_ids_to_tokens(int(windows[0, 0]))
    if quantization:
        result.update(_w8a8(checkpoint, windows, batch_size, last_fp32, seed))
    result["model"] = {
        "path": str(checkpoint.path),
        "class": type(model).__name__,
        "model_type": config.model_type,
        "kind": checkpoint.kind,
        "lm_head": checkpoint.head,
        "layers_module": layers_name,
        "n_layers": len(layers),
        "n_heads": getattr(config, "num_attention_heads", None),
        "hidden_size": config.hidden_size,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    result["summary"] = summarize_hf(result)
    return result


def _layer_internals(model: nn.Module, out, hooks: _Hooks, n_layers: int) -> list[dict]:
    """Per layer, {"attn": (B, H, T, S), optionally "gate"}: a gatelab mixer's own internals where the
    layer holds one, else the model's attention probabilities, which transformers records in layer
    order for its own attention modules only (a layer whose attention was replaced records none)."""
    attentions = [a for a in (getattr(out, "attentions", None) or ()) if a is not None]
    own = [j for j in range(n_layers) if "attn" not in (hooks.mixers.get(j) or {})]
    if len(attentions) not in (len(own), n_layers):
        raise ValueError(
            f"unsupported architecture {type(model).__name__}: it returned {len(attentions)} attention "
            f"matrices for {len(own)} layers with attn_implementation='eager' and output_attentions=True"
        )
    by_layer = dict(zip(own if len(attentions) == len(own) else range(n_layers), attentions))
    mixers = []
    for j in range(n_layers):
        internals = dict(hooks.mixers.get(j) or {})
        if "attn" not in internals:
            internals["attn"] = by_layer[j]
        if "layer" not in hooks.outputs.get(j, {}):
            raise ValueError(
                f"unsupported architecture {type(model).__name__}: layer {j}'s output is not a "
                "(B, T, hidden_size) tensor"
            )
        mixers.append(internals)
    return mixers


def _add_special_shares(special_sum, uniform_sum, mixers, ids, causal: bool) -> None:
    B, T = ids.shape
    # the share each special token would get from a head attending uniformly over its visible keys
    visible = torch.ones(T, T).tril() if causal else torch.ones(T, T)
    uniform = (visible / visible.sum(dim=-1, keepdim=True)).expand(B, 1, T, T)
    for i, per_layer in special_sum.items():
        keys = ids == i
        uniform_sum[i] += float(key_share(uniform, keys)) * B
        for j, mix in enumerate(mixers):
            share = key_share(mix["attn"], keys).cpu() * B
            per_layer[j] = share if per_layer[j] is None else per_layer[j] + share


def _add_channel_maxima(channel_max: dict, tensors: dict, ids: torch.Tensor, offset: int) -> None:
    """Fold one batch's per-channel maxima (and the flat token index holding each) into ``channel_max``."""
    for key, h in tensors.items():
        values, where = channel_maxima(h)
        values, where = values.cpu(), where.cpu() + offset * ids.shape[1]
        if key in channel_max:
            better = values > channel_max[key][0]
            values = torch.where(better, values, channel_max[key][0])
            where = torch.where(better, where, channel_max[key][1])
        channel_max[key] = (values, where)


def _top_dims(maxima, windows: torch.Tensor, tokenizer) -> list[dict]:
    """The TOP_DIMS channels with the largest |activation|, each with the token and position it sits on."""
    values, where = maxima
    T = windows.shape[1]
    top = values.topk(min(TOP_DIMS, len(values)))
    rows = []
    for value, dim in zip(top.values.tolist(), top.indices.tolist()):
        flat = int(where[dim])
        token = int(windows.flatten()[flat])
        rows.append(
            {
                "dim": dim,
                "value": value,
                "position": flat % T,
                "token": tokenizer.convert_ids_to_tokens(token),
            }
        )
    return rows


def _w8a8(checkpoint: Checkpoint, windows, batch_size: int, last_fp32: list[torch.Tensor], seed: int) -> dict:
    """The W8A8 figures: the loss gap (with an LM head; the head stays in FP, as Quantizable Transformers
    keep the final linear layer) and, for every model, the damage to the last layer's output: relative
    error ||h_q - h|| / ||h|| and the mean cosine of mean-pooled sentence embeddings."""
    model = checkpoint.model
    keep = [model.get_output_embeddings()] if checkpoint.head else []
    keep = [m for m in keep if m is not None]
    _, layers = find_layers(model)
    if not any(isinstance(m, nn.Linear) for m in layers.modules()):
        raise ValueError(
            f"{type(model).__name__}'s layers hold no nn.Linear (e.g. GPT-2's Conv1D), which the lab's W8A8 "
            "fake quantisation rounds; it would measure nothing: pass --no-quant"
        )
    device = next(model.parameters()).device
    result: dict = {}
    if checkpoint.head:
        scorer = _Logits(model)
        batches = loss_batches(windows, checkpoint, batch_size, seed)
        result["loss_kind"] = "next-token" if checkpoint.kind == "decoder" else (
            f"masked-LM ({MLM_PROBABILITY:.0%} of the non-special tokens replaced by the mask token)"
        )  # fmt: skip
        result["loss_fp32"] = lm_loss(scorer, batches)
    captured: list[torch.Tensor] = []
    handle = layers[-1].register_forward_hook(lambda _m, _a, out: captured.append(_first(out).float().cpu()))
    try:
        with w8a8(model, keep):
            if checkpoint.head:
                result["loss_w8a8"] = lm_loss(scorer, batches)
            captured.clear()
            for i in range(0, len(windows), batch_size):
                model(input_ids=windows[i : i + batch_size].to(device))
    finally:
        handle.remove()
    if checkpoint.head:
        result["w8a8_gap"] = result["loss_w8a8"] - result["loss_fp32"]
    fp32, quantised = torch.cat(last_fp32), torch.cat(captured)
    result["w8a8_hidden_rel_error"] = float((quantised - fp32).norm() / fp32.norm())
    cosine = nn.functional.cosine_similarity(quantised.mean(dim=1), fp32.mean(dim=1), dim=-1)
    result["w8a8_embedding_cosine"] = float(cosine.mean())
    return result


class _Logits(nn.Module):
    """A transformers LM as lm_loss expects it: idx (B, T) -> (logits (B, T, V),)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor):
        return (self.model(input_ids=idx).logits,)


def summarize_hf(result: dict) -> dict:
    """:func:`summarize` plus the special-token shares (max over layers of the mean over heads), the
    largest activation with its layer, channel and token, and the W8A8 hidden-state figures."""
    summary = summarize(result)
    summary["special_share"] = {
        name: max((v for v in per_layer if v is not None), default=None)
        for name, per_layer in result["special_share_layer"].items()
    }
    best = max(
        ((layer, row) for layer, rows in enumerate(result["top_dims"]) if layer > 0 for row in rows[:1]),
        key=lambda item: item[1]["value"],
        default=None,
    )
    summary["top_activation"] = None if best is None else {"layer": best[0], **best[1]}
    best = max(
        (
            {"layer": j + 1, "module": name, **rows[0]}
            for j, modules in enumerate(result["module_top_dims"])
            for name, rows in modules.items()
        ),
        key=lambda row: row["value"],
        default=None,
    )
    summary["top_module_activation"] = best
    summary["w8a8_hidden_rel_error"] = result.get("w8a8_hidden_rel_error")
    summary["w8a8_embedding_cosine"] = result.get("w8a8_embedding_cosine")
    return summary


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def needed_chars(n_sequences: int, seq_len: int) -> int:
    """Characters of English to read for ``n_sequences`` x ``seq_len`` tokens (about 4 characters per
    subword token; twice that, so a denser text still fills the windows)."""
    return int(math.ceil(n_sequences * seq_len * 8))
