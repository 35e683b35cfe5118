"""The vision side of the lab: the digits tasks, the vision backbone with every gate and (B, H, W, C) mixer,
Gradient Routing as a trainer hook, and `gatelab compare` on digits."""

import pytest
import torch

pytest.importorskip("sklearn")

from gatelab.lab.models.vision import VisionConfig, VisionModel, map_mixers, vision_blocks  # noqa: E402
from gatelab.lab.presets import PRESETS, VISION_MIXER_OPTIONS  # noqa: E402
from gatelab.lab.spec import RunSpec, Variant, build  # noqa: E402
from gatelab.lab.tasks import make_task  # noqa: E402
from gatelab.lab.train import TrainConfig, train  # noqa: E402
from gatelab.lab.train.routing import GATE_LR, GradientRouting, routing_options  # noqa: E402


def model_for(block, segment=False, size=8, **options):
    options = options or VISION_MIXER_OPTIONS.get(block, {})
    config = VisionConfig(11 if segment else 10, size, segment, block, options, d_model=8, n_heads=2, seed=0)
    return VisionModel(config)


# tasks ---------------------------------------------------------------------------------------------------
def test_digits_split_is_fixed_disjoint_and_evaluated_in_order():
    task, again = make_task("digits"), make_task("digits")
    assert torch.equal(task.split["val"], again.split["val"])
    assert len(task.split["val"]) == 359 and len(task.split["train"]) == 1438
    assert not set(task.split["val"].tolist()) & set(task.split["train"].tolist())
    assert not torch.equal(make_task("digits", split_seed=1).split["val"], task.split["val"])
    inputs, targets = task.get_batch("train", 5, torch.Generator().manual_seed(0))
    assert (
        inputs.shape == (5, 1, 8, 8)
        and inputs.dtype == torch.float32
        and 0 <= inputs.min() <= inputs.max() <= 1
    )
    assert targets.shape == (5, 1) and targets.dtype == torch.long
    batches = task.eval_batches(12, 32)
    assert sum(len(x) for x, _ in batches) == 359  # 12 x 32 covers the held-out images, each once
    assert torch.equal(torch.cat([y for _, y in batches]).flatten(), task.labels[task.split["val"]].flatten())


def test_digits_seg_labels_the_strokes_with_their_digit():
    task = make_task("digits_seg")
    assert task.image_size == 16 and task.seq_len == 256 and task.vocab_size == 11
    inputs, targets = task.images, task.labels
    digit = make_task("digits").labels[:, 0]
    ink = inputs[:, 0].flatten(1) > 0.5
    assert torch.equal(targets > 0, ink)
    assert torch.equal(targets.max(dim=1).values, digit + 1)  # every image has strokes, of its own digit
    assert set(targets.unique().tolist()) <= set(range(11))


def test_digits_seg_dice_is_one_for_the_true_masks():
    task = make_task("digits_seg", upsample=1)

    class Oracle(torch.nn.Module):  # returns the true mask's one-hot as logits
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))
            self.lookup = {x.numpy().tobytes(): y for x, y in zip(task.images, task.labels)}

        def forward(self, x):
            y = torch.stack([self.lookup[img.numpy().tobytes()] for img in x])
            return torch.nn.functional.one_hot(y, 11).float() * 50 + self.p, None

    metrics = task.evaluate(Oracle(), n_batches=2, batch_size=16)
    assert metrics["dice"] == pytest.approx(1.0) and metrics["accuracy"] == 1.0


def test_digits_tasks_refuse_bad_options():
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.5"):
        make_task("digits", val_fraction=1.5)
    with pytest.raises(ValueError, match="upsample must be a positive int, got 0"):
        make_task("digits_seg", upsample=0)
    with pytest.raises(TypeError, match="valid options: val_fraction, split_seed"):
        make_task("digits", size=3)


# backbone --------------------------------------------------------------------------------------------
def test_every_block_drops_into_the_backbone():
    assert {"neighborhood", "biformer"} <= set(map_mixers())  # by the registry: new mixers come by themselves
    for segment, size, T, classes in ((False, 8, 1, 10), (True, 16, 256, 11)):
        for block in vision_blocks(segment):
            model = model_for(block, segment, size)
            logits, state = model(torch.rand(2, 1, size, size))
            assert logits.shape == (2, T, classes) and state is None, block
            logits.sum().backward()
            assert all(p.grad is not None for p in model.parameters()), block


def test_backbone_refuses_bad_blocks_and_inputs():
    with pytest.raises(
        ValueError, match="'gated_abmil' does not drop into the vision backbone for segmentation"
    ):
        VisionConfig(11, 16, segment=True, block="gated_abmil")
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        VisionConfig(10, 8, block="nope")
    with pytest.raises(ValueError, match="'softmax' does not drop into"):
        VisionConfig(10, 8, block="softmax")
    model = model_for("cnn")
    with pytest.raises(
        ValueError, match=r"images must have shape \(B, 1, 8, 8\) with B >= 1, got \(1, 8, 8\)"
    ):
        model(torch.rand(1, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(2, 1, 8, 8, dtype=torch.long))


# gradient routing -----------------------------------------------------------------------------------
def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def gate_names(model):
    return {name for name, _ in model.named_parameters() if ".fsg" in f".{name}" or "fsg" in name}


def test_gate_pass_changes_only_the_gates():
    torch.manual_seed(0)
    model = model_for("feature_selection_gate")
    routing = GradientRouting(model, gate_lr=1e-3)
    task = make_task("digits")
    x, y = task.get_batch("train", 16, torch.Generator().manual_seed(0))
    before = snapshot(model)
    routing(lambda: torch.nn.functional.cross_entropy(model(x)[0][:, 0], y[:, 0]))
    after = snapshot(model)
    gates = gate_names(model)
    assert gates == {"net.fsg1.weight", "net.fsg2.weight"}
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in gates), name


def test_main_groups_leave_the_gates_out():
    model = model_for("feature_selection_gate")
    routing = GradientRouting(model)
    config = TrainConfig(steps=1, lr=1e-3)
    grouped = {id(p) for g in routing.main_groups(config) for p in g["params"]}
    gate_ids = {id(p) for p in routing.gate_params}
    assert not grouped & gate_ids and grouped | gate_ids == {id(p) for p in model.parameters()}
    assert routing.gate_lr == GATE_LR and routing_options(model_for("cnn"), config) == {}
    with pytest.raises(ValueError, match="needs a model with Feature-Selection Gates"):
        GradientRouting(model_for("cnn"))
    with pytest.raises(ValueError, match="gate_lr must be a finite number > 0"):
        GradientRouting(model, gate_lr=0)


def test_trainer_runs_the_two_passes_with_two_optimizers():
    torch.manual_seed(0)
    model = model_for("feature_selection_gate")
    task = make_task("digits")
    config = TrainConfig(steps=2, batch_size=8, lr=1e-2, warmup=0, eval_batches=0, log_every=1)
    options = routing_options(model, config)
    routing, seen = options["pre_step"], []

    def spy(loss_fn):  # the state after each gate pass, before the trainer's own step
        before = snapshot(model)
        routing(loss_fn)
        seen.append((before, snapshot(model)))

    start = snapshot(model)
    train(model, task, config, groups=options["groups"], pre_step=spy)
    gates = gate_names(model)
    assert len(seen) == 2
    for before, after in seen:  # after the gate pass only gate parameters changed
        assert all(torch.equal(before[n], after[n]) != (n in gates) for n in before)
    end = snapshot(model)
    assert all(not torch.equal(start[n], end[n]) for n in start)  # then the main step moved the rest
    for n in gates:  # the gates moved only by the gate optimizer's two tiny steps (AdamW: <= lr each)
        assert (end[n] - start[n]).abs().max() <= 2.5 * GATE_LR
    with pytest.raises(ValueError, match="resume is not supported with a pre_step"):
        train(model, task, TrainConfig(steps=1, resume=True, out_dir="x"), pre_step=spy)


# spec and compare ----------------------------------------------------------------------------------
def test_run_spec_builds_vision_runs_and_checks_their_blocks():
    spec = PRESETS["vision"].run_spec("digits", Variant.parse("feature_selection_gate[routing_lr=null]"))
    task, model, _ = build(spec)
    assert isinstance(model, VisionModel) and model.gradient_routing_lr is None
    spec = PRESETS["vision"].run_spec("digits_seg", Variant.parse("biformer"))
    assert build(spec)[1].config.block_options == VISION_MIXER_OPTIONS["biformer"]
    with pytest.raises(ValueError, match="digits: 'gated_abmil' does not drop"):
        RunSpec(task="digits_seg", pattern="gated_abmil", name="digits")
    with pytest.raises(ValueError, match="attention_gate .* is for the LM, not digits"):
        RunSpec(task="digits", pattern="cnn", attention_gate={"target_keep": 0.5})
    with pytest.raises(TypeError, match="neighborhood options"):
        RunSpec(task="digits", pattern="neighborhood", mixer_options={"neighborhood": {"kernel": 3}})
    # a mixer fixed to its map size gets the backbone's, in the spec's early check as in the model
    spec = PRESETS["vision"].run_spec("digits", Variant.parse("ninformer"))
    assert build(spec)[1].net.mixers[0].config.map_size == (8, 8)


def test_compare_on_digits(tmp_path):
    import gatelab.lab

    threads = torch.get_num_threads()
    try:
        results = gatelab.lab.compare(
            "vision", tasks=["digits", "digits_seg"], mixers="cnn,feature_selection_gate,class_prob_gate",
            steps=2, seeds=1, out=tmp_path, name="v", threads=1,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    runs = results["runs"]
    assert [r["status"] for r in runs] == ["ok"] * 6
    assert all(r["images_per_s"] > 0 and r["params"] > 0 for r in runs)
    assert all("dice" in r["final"] for r in runs if r["task"] == "digits_seg")
    report = (tmp_path / "v" / "report.md").read_text()
    assert "| mixer | eval loss | accuracy | Dice | images/s | params | wall s |" in report
    from gatelab.lab.comparison import plan

    with pytest.raises(ValueError, match=r"--kv-cache decodes LMs; drop the vision tasks \['digits'\]"):
        plan(PRESETS["vision"], {}, ["digits"], [0], "cpu", kv_cache=object())
    with pytest.raises(ValueError, match="'softmax' does not run on digits"):
        gatelab.lab.compare("vision", tasks=["digits"], mixers="softmax", out=tmp_path)


def test_trainer_step_without_a_hook_is_the_plain_adamw_step():
    """The step the trainer took before pre_step existed, written out: CE backward, clip, one AdamW step."""
    from gatelab.lab.train import lr_at, param_groups

    task = make_task("digits")
    config = TrainConfig(steps=1, batch_size=8, lr=1e-2, warmup=0, eval_batches=0, seed=3)
    model, manual = model_for("grid_attention_gate"), model_for("grid_attention_gate")
    manual.load_state_dict(model.state_dict())
    train(model, task, config)
    x, y = task.get_batch("train", 8, torch.Generator().manual_seed(3))
    loss = torch.nn.functional.cross_entropy(manual(x)[0].flatten(0, 1), y.flatten(), reduction="sum") / 8
    loss.backward()
    torch.nn.utils.clip_grad_norm_(manual.parameters(), config.grad_clip)
    optimizer = torch.optim.AdamW(
        param_groups(manual, config.weight_decay), lr=lr_at(0, config), betas=(0.9, 0.95)
    )
    optimizer.step()
    for (name, p), q in zip(model.named_parameters(), manual.parameters()):
        assert torch.equal(p, q), name
