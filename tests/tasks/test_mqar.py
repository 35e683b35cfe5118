"""MQAR as Zoology generates it: ranges, layout, labels only at query positions, power-law gaps,
determinism by seed."""

import pytest
import torch

from gatelab.lab.tasks import IGNORE, make_task
from gatelab.lab.tasks.mqar import power_law


def batch(seed=0, B=64, **options):
    options = {"vocab_size": 40, "seq_len": 32, "num_kv_pairs": 4, **options}
    task = make_task("mqar", **options)
    return task, *task.get_batch("train", B, torch.Generator().manual_seed(seed))


def test_layout_ranges_and_labels():
    task, inputs, targets = batch()
    B, T, kv, V = 64, 32, 4, 40
    assert inputs.shape == targets.shape == (B, T) and inputs.dtype == targets.dtype == torch.long
    keys, values = inputs[:, 0 : 2 * kv : 2], inputs[:, 1 : 2 * kv : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert all(len(set(row.tolist())) == kv for row in keys)  # distinct keys per sequence
    assert all(len(set(row.tolist())) == kv for row in values)
    assert (targets[:, : 2 * kv] == IGNORE).all()  # no label inside the pairs
    region, region_targets = inputs[:, 2 * kv :], targets[:, 2 * kv :]
    labelled = region_targets != IGNORE
    assert (labelled.sum(1) == kv).all()  # each key is queried exactly once
    assert (labelled[:, 1::2] == 0).all()  # queries sit at even offsets
    assert (region[~labelled] == 0).all()  # fillers are 0
    for b in range(B):  # the label at a query is the value of the key found there
        lookup = dict(zip(keys[b].tolist(), values[b].tolist()))
        for key, value in zip(region[b][labelled[b]].tolist(), region_targets[b][labelled[b]].tolist()):
            assert lookup[key] == value


def test_random_fillers_only_replace_fillers():
    _, plain, targets = batch(seed=3)
    _, noisy, targets2 = batch(seed=3, random_fillers=True)
    assert torch.equal(targets, targets2)
    assert torch.equal(plain[plain != 0], noisy[plain != 0])
    assert (noisy[plain == 0] != 0).float().mean() > 0.9


def test_power_law_gap_distribution():
    # with one pair the gap is a single draw from p(i) ~ a i^(a-1): compare the histogram with it
    T, kv, B = 24, 1, 20000
    _, _, targets = batch(seed=1, B=B, seq_len=T, num_kv_pairs=kv)
    gaps = ((targets != IGNORE).float().argmax(1) - 2 * kv) // 2
    space = (T - 2 * kv) // 2
    freq = torch.bincount(gaps, minlength=space).double() / B
    expected = power_law(space, 0.01)
    assert (freq - expected).abs().max() < 0.015
    assert expected[0] > 5 * expected[-1]  # a = 0.01: strongly favours short gaps


def test_determinism_by_seed_and_eval_batches():
    _, a, ta = batch(seed=7)
    _, b, tb = batch(seed=7)
    _, c, _ = batch(seed=8)
    assert torch.equal(a, b) and torch.equal(ta, tb) and not torch.equal(a, c)
    task = make_task("mqar", vocab_size=40, seq_len=32, num_kv_pairs=4)
    first, second = task.eval_batches(2, 8, seed=5), task.eval_batches(2, 8, seed=5)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(first, second))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"seq_len": 31}, "even"),
        ({"vocab_size": 32}, "larger than seq_len"),
        ({"num_kv_pairs": 9}, "4 \\* num_kv_pairs"),
        ({"power_a": 0.0}, "power_a"),
    ],
)
def test_errors(options, message):
    with pytest.raises(ValueError, match=message):
        make_task("mqar", **{"vocab_size": 40, "seq_len": 32, "num_kv_pairs": 4, **options})


def test_unknown_task_and_option():
    with pytest.raises(ValueError, match="known tasks"):
        make_task("nope")
    with pytest.raises(TypeError, match="valid options"):
        make_task("mqar", kv=3)
    with pytest.raises(ValueError, match="split"):
        make_task("mqar").get_batch("test", 2, torch.Generator())


def test_evaluate_reports_accuracy_at_query_positions():
    task = make_task("mqar", vocab_size=40, seq_len=32, num_kv_pairs=4)

    class Oracle(torch.nn.Module):  # answers every query right: accuracy 1, low loss
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            B, T = idx.shape
            logits = torch.zeros(B, T, 40)
            for b in range(B):
                lookup = dict(zip(idx[b, 0:8:2].tolist(), idx[b, 1:8:2].tolist()))
                for t in range(8, T):
                    if idx[b, t].item() in lookup:
                        logits[b, t, lookup[idx[b, t].item()]] = 20.0
            return logits, None

    metrics = task.evaluate(Oracle(), n_batches=2, batch_size=4, seed=0)
    assert metrics["accuracy"] == 1.0 and metrics["loss"] < 1e-6
