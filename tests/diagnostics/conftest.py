"""A tiny LM with the lab's internals interface, built from modules whose internals are known exactly,
so the diagnostics can be checked against hand-computed answers."""

import pytest
import torch
import torch.nn as nn


class SinkMixer(nn.Module):
    """Puts all attention on the first token: o_t = v_0; internals "attn" one-hot on key 0."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        attn = torch.zeros(B, self.n_heads, T, T)
        attn[..., 0] = 1.0
        return self.v(x[:, :1]).expand_as(x), {"attn": attn}


class UniformMixer(nn.Module):
    """Causal mean of the values (uniform attention), with a constant gate of 0.05 on half the channels
    and 0.5 on the rest."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.n_heads = n_heads
        self.v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        mask = torch.tril(torch.ones(T, T))
        attn = (mask / mask.sum(-1, keepdim=True)).expand(B, self.n_heads, T, T)
        gate = torch.full((B, T, self.n_heads, D // self.n_heads), 0.5)
        gate[..., : D // self.n_heads // 2] = 0.05
        return torch.einsum("ts,bsd->btd", attn[0, 0], self.v(x)), {"attn": attn, "gate": gate}


class NoInternalsMixer(nn.Module):
    """A token-wise mixer with no attention matrix (as a recurrent mixer without a reference path)."""

    def __init__(self, d_model, n_heads):
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x):
        return self.proj(x), {}


class TinyLM(nn.Module):
    def __init__(self, kinds=("sink", "uniform", "none"), vocab_size=16, d_model=8, n_heads=2):
        super().__init__()
        table = {"sink": SinkMixer, "uniform": UniformMixer, "none": NoInternalsMixer}
        self.layer_keys = list(kinds)
        self.embed = nn.Embedding(vocab_size, d_model)
        self.mixers = nn.ModuleList(table[k](d_model, n_heads) for k in kinds)
        self.mlps = nn.ModuleList(nn.Linear(d_model, d_model) for _ in kinds)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, as the lab's LM

    def forward(self, idx, states=None, *, return_internals=False):
        h = self.embed(idx)
        hidden, block_out, mixers = [h], [], []
        for mixer, mlp in zip(self.mixers, self.mlps):
            y, internals = mixer(h)
            out = y + mlp(h + y)
            h = h + out
            hidden.append(h)
            block_out.append(out)
            mixers.append(internals)
        logits = self.head(h)
        if return_internals:
            return (
                logits,
                [None] * len(self.mixers),
                {"hidden": hidden, "block_out": block_out, "mixers": mixers},
            )
        return logits, [None] * len(self.mixers)


@pytest.fixture
def tiny_lm_class():
    return TinyLM


@pytest.fixture
def tiny_lm():
    return TinyLM()


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        inputs = torch.randint(0, 16, (3, 10), generator=g)
        targets = torch.randint(0, 16, (3, 10), generator=g)
        targets[:, :4] = -100
        out.append((inputs, targets))
    return out
