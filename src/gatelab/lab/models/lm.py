"""One decoder LM for any layer pattern: token embedding, pre-norm blocks (RMSNorm) with a mixer per
layer and a SwiGLU MLP (or an MoE of SwiGLU experts, gatelab.gates.moe), tied output head (Language Models are Unsupervised Multitask Learners,
Radford et al., 2019, for the init; GLU Variants Improve Transformer, Shazeer, 2020, for the MLP).

The architecture options (``LMConfig.positions``, ``norm``, ``mlp``) turn it into a GPT-2-style decoder
(learned absolute positions, LayerNorm, GELU MLP; ``ARCHITECTURES["gpt2"]``) or keep the Llama-style
default."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gatelab.registry import get, make_mixer

INIT_STD = 0.02
POSITIONS = ("rope", "learned", "none")  # each mixer's own (RoPE) | a learned absolute embedding | NoPE
NORMS = ("rms", "layer")  # nn.RMSNorm (eps 1e-6) | nn.LayerNorm (eps 1e-5, with bias)
DENSE_MLPS = ("swiglu", "gelu")
# named architectures: the LMConfig fields they set
ARCHITECTURES: dict[str, dict[str, str]] = {
    "llama": {"positions": "rope", "norm": "rms", "mlp": "swiglu"},
    "gpt2": {"positions": "learned", "norm": "layer", "mlp": "gelu"},
}
DEFAULT_ARCH = ARCHITECTURES["llama"]


def architecture(name: str) -> dict[str, str]:
    """The LMConfig fields (positions, norm, mlp) of the named architecture (a key of ARCHITECTURES)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {name!r}")
    return dict(ARCHITECTURES[name])


def mixer_rope_options(key: str, options: dict, positions: str) -> dict:
    """``options`` of mixer ``key`` under ``positions``: with "learned" or "none" a mixer whose config has a
    ``rope`` field gets rope=False (an explicit rope=True is an error); with "rope" they are unchanged."""
    if positions == "rope" or "rope" not in {f.name for f in dataclasses.fields(get(key).config_cls)}:
        return options
    if options.get("rope", False) is not False:
        raise ValueError(
            f"mixer {key!r} option rope={options['rope']!r} conflicts with positions={positions!r}: "
            "RoPE is only used with positions='rope'"
        )
    return {**options, "rope": False}


def parse_pattern(pattern: str, n_layers: int) -> list[str]:
    """Mixer key per layer from a pattern, repeated to the depth.

    ``"softmax*4"`` -> 4 x softmax; ``"gated_deltanet*3,gated_softmax"`` with n_layers=8 -> the 4-layer
    unit twice. The depth must be a multiple of the unit's length; every key must be registered.
    """
    if not isinstance(pattern, str) or not pattern.strip():
        raise ValueError(f"pattern must be a non-empty string like 'softmax*4', got {pattern!r}")
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise ValueError(f"n_layers must be a positive int, got {n_layers!r}")
    unit: list[str] = []
    for part in pattern.replace(" ", "").split(","):
        key, _, count = part.partition("*")
        if not key:
            raise ValueError(f"pattern {pattern!r} has an empty entry; write e.g. 'softmax*3,gated_softmax'")
        if count and (not count.isdigit() or int(count) < 1):
            raise ValueError(
                f"pattern {pattern!r}: repeat count after '*' must be a positive int, got {count!r}"
            )
        spec = get(key)  # raises, listing the known keys, if unknown
        if spec.family == "gate":
            raise ValueError(f"pattern {pattern!r}: {key!r} is a gate, not a sequence mixer (an MoE router goes "
                             f"in the MLP slot: mlp='moe:{key}')")  # fmt: skip
        if not spec.causal:
            raise ValueError(
                f"pattern {pattern!r}: mechanism {key!r} is not causal and cannot be used in a decoder"
            )
        unit += [key] * (int(count) if count else 1)
    if n_layers % len(unit):
        raise ValueError(
            f"pattern {pattern!r} has {len(unit)} layers per repeat; n_layers ({n_layers}) must be a multiple of it"
        )
    return unit * (n_layers // len(unit))


@dataclass
class LMConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    pattern: str = "softmax"
    mlp_ratio: float = 4.0  # SwiGLU hidden = 2/3 * mlp_ratio * d_model (rounded up to 8): same params as GELU
    mixer_options: dict = field(default_factory=dict)  # key (or "*") -> extra make_mixer options
    max_seq_len: int = 1024
    tie_embeddings: bool = True
    seed: int | None = None  # if set, the init is reproducible regardless of the global RNG
    # options of gatelab.cache's attention gate (e.g. {"target_keep": 0.5}): every softmax-family layer gets
    # a KV-cache eviction gate that trains with the LM from scratch (its eviction-rate loss is added by the
    # trainer); None: no gates
    attention_gate: dict | None = None
    # the MLP of every block: "swiglu" (dense) or "moe:<router>" (gatelab.gates.moe: E small SwiGLU experts
    # behind a registered router); mlp_options of an MoE: n_experts (4), expert_hidden (default: the dense
    # MLP's hidden / 2, so two experts cost one dense MLP), path ("sparse" | "dense"), the rest the router's
    # "gelu": a GPT-2 MLP, Linear(d, int(mlp_ratio * d)) -> GELU (tanh) -> Linear back
    mlp: str = "swiglu"
    mlp_options: dict = field(default_factory=dict)
    # where positions come from: "rope" (each mixer's own: RoPE in softmax-family attention), "learned" (an
    # absolute embedding added to the tokens, RoPE off) or "none" (NoPE, RoPE off)
    positions: str = "rope"
    norm: str = "rms"  # every block norm and the final one: "rms" (RMSNorm) or "layer" (LayerNorm)

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not isinstance(self.mlp_ratio, int | float) or self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not isinstance(self.mixer_options, dict) or not all(
            isinstance(v, dict) for v in self.mixer_options.values()
        ):
            raise TypeError(
                f"mixer_options must map a mechanism key or '*' to a dict, got {self.mixer_options!r}"
            )
        self.layer_keys()  # validates the pattern against the depth and the registry
        for key in set(self.mixer_options) - {"*"}:
            get(key)  # a typo in a key is an error; keys absent from this pattern are simply unused
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        if self.attention_gate is not None and not isinstance(self.attention_gate, dict):
            raise TypeError(
                f"attention_gate must be a dict of gate options or None, got {self.attention_gate!r}"
            )
        if self.positions not in POSITIONS:
            raise ValueError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        self.moe_router()  # validates mlp and mlp_options
        for key in dict.fromkeys(self.layer_keys()):  # an explicit rope=True against positions
            mixer_rope_options(key, {**self.mixer_options.get("*", {}), **self.mixer_options.get(key, {})},
                               self.positions)  # fmt: skip

    def moe_router(self) -> str | None:
        """The router key of an ``"moe:<router>"`` MLP, None for a dense one ("swiglu", "gelu"); checks mlp
        and its options."""
        if not isinstance(self.mlp_options, dict):
            raise TypeError(f"mlp_options must be a dict, got {self.mlp_options!r}")
        if self.mlp in DENSE_MLPS:
            if self.mlp_options:
                raise ValueError(f"mlp_options {self.mlp_options} apply to an MoE MLP; mlp is {self.mlp!r}")
            return None
        from gatelab.gates.moe import router_keys

        prefix, colon, router = self.mlp.partition(":") if isinstance(self.mlp, str) else ("", "", "")
        if prefix != "moe" or not colon or router not in router_keys():
            raise ValueError(
                f"mlp must be 'swiglu', 'gelu' or 'moe:<router>' with a router among "
                f"{', '.join(router_keys())}; "
                f"got {self.mlp!r}"
            )
        from gatelab.gates.moe.mlp import check_sizes

        moe, router_options = self.moe_options()
        check_sizes(**moe)
        config_cls = get(router).config_cls
        try:
            config_cls(d_model=self.d_model, n_experts=moe["n_experts"], **router_options)
        except TypeError as error:
            names = sorted({f.name for f in dataclasses.fields(config_cls)} - {"d_model"})
            valid = ", ".join(["expert_hidden", "path", *names])
            raise TypeError(f"mlp_options of {self.mlp}: {error}; valid options: {valid}") from None
        return router

    def moe_options(self) -> tuple[dict, dict]:
        """(MoEMLP options, router options) of an MoE MLP, defaults filled in."""
        moe_names = ("n_experts", "expert_hidden", "path")
        moe = {"n_experts": 4, "expert_hidden": max(8, -(-self.mlp_hidden // 16) * 8), "path": "sparse"}
        moe.update({k: v for k, v in self.mlp_options.items() if k in moe_names})
        return moe, {k: v for k, v in self.mlp_options.items() if k not in moe_names}

    def layer_keys(self) -> list[str]:
        return parse_pattern(self.pattern, self.n_layers)

    @property
    def mlp_hidden(self) -> int:
        """The dense MLP's hidden width: int(mlp_ratio * d_model) for GELU; 2/3 of it for SwiGLU (rounded
        up to 8; an MoE's experts are sized from it)."""
        if self.mlp == "gelu":
            return int(self.mlp_ratio * self.d_model)
        hidden = int(2 * self.mlp_ratio * self.d_model / 3)
        return max(8, -(-hidden // 8) * 8)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TIED_KEY = "head.weight"  # with tied embeddings the same Parameter as "embed.weight", saved once
MODEL_FILES = ("model.safetensors", "config.json")  # what save writes (then its manifest)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class GeluMLP(nn.Module):
    """GPT-2's MLP: (..., d_model) -> Linear(d, hidden) -> GELU (tanh approximation) -> Linear(hidden, d)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def make_norm(config: LMConfig) -> nn.Module:
    """The norm ``config.norm`` names over d_model."""
    if config.norm == "layer":
        return nn.LayerNorm(config.d_model, eps=1e-5)
    return nn.RMSNorm(config.d_model, eps=1e-6)


class LMStates(list):
    """The per-layer states LM.forward returns; ``position``: tokens seen so far (the next token's index)."""

    def __init__(self, states=(), position: int = 0):
        super().__init__(states)
        self.position = position


class Block(nn.Module):
    """x + mixer(norm(x)), then + mlp(norm(x))."""

    def __init__(self, key: str, config: LMConfig, layer_idx: int = 0):
        super().__init__()
        options = {**config.mixer_options.get("*", {}), **config.mixer_options.get(key, {})}
        options = mixer_rope_options(key, options, config.positions)
        names = {f.name for f in dataclasses.fields(get(key).config_cls)}
        if {"layer_idx", "n_layers"} <= names:  # depth-dependent mixers (Lightning's decay schedule)
            options = {"layer_idx": layer_idx, "n_layers": config.n_layers, **options}
        self.key = key
        self.mixer_norm = make_norm(config)
        self.mixer = make_mixer(key, d_model=config.d_model, n_heads=config.n_heads, **options)
        self.mlp_norm = make_norm(config)
        router = config.moe_router()
        if config.mlp == "gelu":
            self.mlp = GeluMLP(config.d_model, config.mlp_hidden)
        elif router is None:
            self.mlp = SwiGLU(config.d_model, config.mlp_hidden)
        else:
            from gatelab.gates.moe import MoEMLP

            moe, router_options = config.moe_options()
            self.mlp = MoEMLP(config.d_model, router=router, router_options=router_options, **moe)

    def forward(self, x, state, return_internals: bool):
        out = self.mixer(self.mixer_norm(x), state, return_internals=return_internals)
        mixed, state = out[0], out[1]
        h = x + mixed
        mlp_out = self.mlp(self.mlp_norm(h))
        internals = out[2] if return_internals else None
        return h + mlp_out, state, mixed + mlp_out, internals


class LM(nn.Module):
    """Decoder LM. ``forward(idx (B, T) long) -> (logits (B, T, vocab), states)``."""

    def __init__(self, config: LMConfig):
        super().__init__()
        if not isinstance(config, LMConfig):
            raise TypeError(f"LM takes an LMConfig, got {type(config).__name__}")
        self.config = config
        self.layer_keys = config.layer_keys()
        with torch.random.fork_rng(enabled=config.seed is not None, devices=[]):
            if config.seed is not None:
                torch.manual_seed(config.seed)
            self.embed = nn.Embedding(config.vocab_size, config.d_model)
            self.blocks = nn.ModuleList(Block(key, config, i) for i, key in enumerate(self.layer_keys))
            self.norm = make_norm(config)
            if config.tie_embeddings:  # one Parameter: the head is a Linear like any other (W8A8 sees it)
                # skip_init draws no random numbers: seeded inits stay what they were with a plain F.linear
                self.head = torch.nn.utils.skip_init(nn.Linear, config.d_model, config.vocab_size, bias=False)
                self.head.weight = self.embed.weight
            else:
                self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            if config.positions == "learned":  # made last: the default model's seeded init is unchanged
                self.pos_embed = nn.Embedding(config.max_seq_len, config.d_model)
            self.reset_parameters()
            if config.attention_gate is not None:
                self._add_attention_gates(config.attention_gate)

    def _add_attention_gates(self, options: dict) -> None:
        """An attention gate on every layer that keeps a KV cache (softmax family); other layers (recurrent,
        or managing their own cache) get none. A model without such a layer is an error."""
        from gatelab.cache import apply_policy

        if not apply_policy(self, "attention_gate", skip_uncacheable=True, **options):
            raise ValueError(
                f"attention_gate needs a softmax-family layer with a KV cache; pattern {self.config.pattern!r} "
                "has none"
            )

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02); projections into the residual stream scaled by 1/sqrt(2 n_layers).
        Mixers with a ``reset_parameters(std, n_layers)`` use it; others keep their own init."""
        L = self.config.n_layers
        nn.init.normal_(self.embed.weight, std=INIT_STD)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.head.weight, std=INIT_STD)
        for block in self.blocks:
            if isinstance(block.mlp, SwiGLU):
                nn.init.normal_(block.mlp.gate_up.weight, std=INIT_STD)
                nn.init.normal_(block.mlp.down.weight, std=INIT_STD / math.sqrt(2 * L))
            elif isinstance(block.mlp, GeluMLP):
                nn.init.normal_(block.mlp.fc.weight, std=INIT_STD)
                nn.init.normal_(block.mlp.proj.weight, std=INIT_STD / math.sqrt(2 * L))
            else:  # an MoE MLP: its experts as the MLP, its router keeps its own init
                block.mlp.reset_parameters(std=INIT_STD, n_layers=L)
            if hasattr(block.mixer, "reset_parameters"):
                block.mixer.reset_parameters(std=INIT_STD, n_layers=L)
        if hasattr(self, "pos_embed"):
            nn.init.normal_(self.pos_embed.weight, std=INIT_STD)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed.weight.numel() if exclude_embeddings else n

    def forward(self, idx: torch.Tensor, states: list | None = None, *, return_internals: bool = False):
        """idx (B, T) long token ids -> logits (B, T, vocab) fp32-or-autocast dtype, states (an LMStates:
        one per layer, ``position`` the tokens seen so far).

        ``states`` continues a sequence (decoding) from the position it records (a plain list of the
        layers' states counts as position 0; with learned positions it must be the LMStates forward
        returned). With ``return_internals=True`` a third value:
        {"hidden": [h_0 .. h_L] (B, T, d_model) residual stream after the embedding and each block,
         "block_out": per block its contribution to the stream (mixer + MLP) (B, T, d_model),
         "mixers": per layer the mixer's internals dict}.
        """
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.ndim != 2:
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise ValueError(f"idx must be a (B, T) long tensor, got {got}")
        T = idx.shape[1]
        if T == 0 or T > self.config.max_seq_len:
            raise ValueError(f"idx length must be in [1, max_seq_len={self.config.max_seq_len}], got {T}")
        if states is None:
            states, offset = [None] * len(self.blocks), 0
        elif not isinstance(states, list | tuple) or len(states) != len(self.blocks):
            raise ValueError(f"states must be the list of {len(self.blocks)} states forward returned")
        elif isinstance(states, LMStates):
            offset = states.position
        elif self.config.positions == "learned":
            raise ValueError(
                "states must be the LMStates forward returned (it records the position) with "
                f"positions='learned', got a {type(states).__name__}"
            )
        else:
            offset = 0
        x = self.embed(idx)  # (B, T, d_model)
        # rope / none decode past max_seq_len (--kv-context); a learned embedding has max_seq_len rows
        if self.config.positions == "learned":
            if offset + T > self.config.max_seq_len:
                raise ValueError(
                    f"{offset} tokens seen + {T} new exceed max_seq_len ({self.config.max_seq_len}), the "
                    "rows of the learned position embedding"
                )
            x = x + self.pos_embed(torch.arange(offset, offset + T, device=idx.device))
        hidden, block_out, mixers, new_states = [x], [], [], LMStates(position=offset + T)
        for block, state in zip(self.blocks, states):
            x, state, out, internals = block(x, state, return_internals)
            new_states.append(state)
            if return_internals:
                hidden.append(x)
                block_out.append(out)
                mixers.append(internals)
        logits = self.head(self.norm(x))  # (B, T, vocab)
        if return_internals:
            return logits, new_states, {"hidden": hidden, "block_out": block_out, "mixers": mixers}
        return logits, new_states

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> (B, T + max_new_tokens). Prefills once, then feeds one token at a time with the
        mixers' states (no recomputation of the prefix). temperature 0 = greedy."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
        if idx.shape[1] + max_new_tokens > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds max_seq_len "
                f"({self.config.max_seq_len})"
            )
        if max_new_tokens == 0:
            return idx
        logits, states = self(idx)
        out = [idx]
        for i in range(max_new_tokens):
            last = logits[:, -1].float()  # (B, vocab)
            if temperature == 0:
                token = last.argmax(dim=-1, keepdim=True)
            else:
                last = last / temperature
                if top_k is not None:
                    kth = torch.topk(last, min(top_k, last.shape[-1])).values[:, -1:]
                    last = last.masked_fill(last < kth, float("-inf"))
                token = torch.multinomial(F.softmax(last, dim=-1), 1, generator=generator)
            out.append(token)
            if i + 1 < max_new_tokens:
                logits, states = self(token, states)
        return torch.cat(out, dim=1)

    def save(self, path_dir: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` into ``path_dir`` (each atomically), then
        ``manifest.json`` with their sha256, last: :meth:`load` checks the files against it."""
        from safetensors.torch import save

        from gatelab.lab.rundir import atomic_write_bytes, atomic_write_text, write_manifest

        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            del tensors[TIED_KEY]  # safetensors stores no shared tensor: the embedding holds it
        atomic_write_bytes(path / "model.safetensors", save(tensors, metadata={"format": "pt"}))
        atomic_write_text(path / "config.json", json.dumps(self.config.to_dict(), indent=2))
        write_manifest(path, MODEL_FILES)

    @classmethod
    def load(cls, path_dir: str | Path, device: str | torch.device = "cpu") -> LM:
        """The LM :meth:`save` wrote into ``path_dir``, on ``device``.

        The files are checked against ``manifest.json`` first (IntegrityError naming a file that is
        missing, torn or changed). A folder without a manifest (saved by gatelab before it wrote one)
        still loads, with a warning that nothing could be checked; a torn or truncated file in it is
        still an IntegrityError naming the file."""
        from gatelab.lab.rundir import MANIFEST, IntegrityError, read_json, read_safetensors, verify_manifest

        path = Path(path_dir)
        for name in MODEL_FILES:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name} not found: LM.load needs a folder written by LM.save")
        if (path / MANIFEST).is_file():
            verify_manifest(path)
        else:
            warnings.warn(
                f"{path} has no {MANIFEST} (saved by an older gatelab): its files cannot be checked; "
                "LM.save writes one",
                stacklevel=2,
            )
        options = read_json(path / "config.json")
        if not isinstance(options, dict):
            raise IntegrityError(f"{str(path / 'config.json')!r} holds no LMConfig (a JSON object expected)")
        try:
            config = LMConfig(**options)
        except TypeError as error:
            raise IntegrityError(f"{str(path / 'config.json')!r} is not an LMConfig: {error}") from None
        model = cls(config)
        model.load_tensors(read_safetensors(path / "model.safetensors", device=str(device)))
        return model.to(device)

    def load_tensors(self, tensors: dict) -> None:
        """load_state_dict for what :meth:`save` writes: with tied embeddings the head's weight is the
        embedding's and is not stored; any other missing or unexpected key is an error."""
        missing, unexpected = self.load_state_dict(tensors, strict=False)
        allowed = {TIED_KEY} if self.config.tie_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise RuntimeError(
                f"the saved tensors do not fit this LM: missing {sorted(set(missing) - allowed)}, "
                f"unexpected {sorted(unexpected)}"
            )
