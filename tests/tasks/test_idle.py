"""The idle-heads task: layout, the deterministic chain, labels only where documented."""

import pytest
import torch

from gatelab.lab.tasks import IGNORE, make_task
from gatelab.lab.tasks.idle import BOS


def make(**options):
    return make_task("idle", **{"vocab_size": 64, "seq_len": 64, "n_pairs": 3, "n_queries": 3, **options})


def test_layout_chain_and_labels():
    task = make()
    inputs, targets = task.get_batch("train", 32, torch.Generator().manual_seed(0))
    n, T = 3, 64
    assert inputs.shape == targets.shape == (32, T)
    assert (inputs[:, 0] == BOS).all() and (targets[:, : 1 + 2 * n] == IGNORE).all()
    keys, values = inputs[:, 1 : 1 + 2 * n : 2], inputs[:, 2 : 2 + 2 * n : 2]
    assert task.is_key(keys).all() and ((values >= task.value_lo) & (values < task.chain_lo)).all()
    query = (targets != IGNORE) & task.is_key(inputs)
    chain = (targets != IGNORE) & task.is_chain(inputs)
    assert ((targets != IGNORE) == (query | chain)).all()  # nothing else is labelled
    assert (query.sum(1) == 3).all()  # n_queries per sequence, rare: under 5% of positions
    assert query.float().mean() < 0.05 and chain.float().mean() > 0.7
    # chain labels are the fixed successor of the current token: no attention needed
    assert torch.equal(targets[chain], task.successor[inputs[chain]])
    for b in range(32):  # query labels are the stored value of that key
        lookup = dict(zip(keys[b].tolist(), values[b].tolist()))
        for t in query[b].nonzero().flatten().tolist():
            assert targets[b, t].item() == lookup[inputs[b, t].item()]
            assert inputs[b, t + 1].item() == targets[b, t].item()  # the value then appears in the input


def test_chain_is_one_cycle_fixed_by_seed():
    task = make()
    token, seen = task.chain_lo, set()
    for _ in range(64 - task.chain_lo):
        seen.add(token)
        token = task.successor[token].item()
    assert token == task.chain_lo and len(seen) == 64 - task.chain_lo
    assert torch.equal(make().successor, task.successor)
    assert not torch.equal(make(seed=1).successor, task.successor)


def test_unlabelled_chain_option_and_determinism():
    task = make(label_chain=False)
    a = task.get_batch("train", 8, torch.Generator().manual_seed(4))
    b = task.get_batch("train", 8, torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert ((a[1] != IGNORE) == ((a[1] != IGNORE) & task.is_key(a[0]))).all()  # only queries labelled


def test_evaluate_reports_query_and_chain_accuracy():
    task = make()

    class ChainOnly(torch.nn.Module):  # knows the chain, not the pairs: chain 1.0, queries ~0
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            logits = torch.nn.functional.one_hot(task.successor[idx], 64).float() * 30
            return logits, None

    metrics = task.evaluate(ChainOnly(), n_batches=2, batch_size=8)
    assert metrics["chain_accuracy"] == 1.0 and metrics["accuracy"] == 0.0


def test_errors():
    with pytest.raises(ValueError, match="too short"):
        make(seq_len=20, n_queries=4)
    with pytest.raises(ValueError, match="distinct keys"):
        make(n_pairs=20)
