"""Training through megatron-core's schedule, DDP and optimizer, in-process on CPU."""
import math

import pytest
import torch

from mmpretrain.config import load
from mmpretrain.dataset import make_loader
from mmpretrain.train.loop import setup
from mmpretrain.train.step import train_step


def small_cfg(path, *sets):
    return load(None, [f"data.path={path}", "data.seq_length=128", "data.micro_batch_size=2",
                       "data.image_token_budget=16", "train.global_batch_size=2",
                       "train.warmup_steps=0", "train.steps=10", *sets])


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(module, before):
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


def test_alignment_stage_trains_only_the_projector(megatron_world, small_dataset):
    cfg = small_cfg(small_dataset, "vision.freeze=true", "decoder.freeze=true")
    _, tok, (model,), ddps, optimizer, scheduler = setup(cfg)
    before = {name: snapshot(getattr(model, name)) for name in ("vision", "projector", "language_model")}
    batch = next(iter(make_loader(cfg, "train", tok)))
    loss, tokens, grad_norm, ok = train_step(ddps, optimizer, [batch], 128)
    assert ok and tokens > 0 and grad_norm > 0 and loss > 0
    assert not changed(model.vision, before["vision"])
    assert not changed(model.language_model, before["language_model"])
    assert changed(model.projector, before["projector"]) == set(before["projector"])


def test_loss_falls_on_a_repeated_batch(megatron_world, small_dataset):
    cfg = small_cfg(small_dataset, "train.lr=1e-3", "train.steps=20")
    _, tok, _, ddps, optimizer, scheduler = setup(cfg)
    batch = next(iter(make_loader(cfg, "train", tok)))
    losses = []
    for _ in range(12):
        loss, *_ = train_step(ddps, optimizer, [batch], 128)
        scheduler.step(1)
        losses.append(loss)
    assert losses[-1] < 0.75 * losses[0], losses


def test_bf16_step_checkpoint_and_reload(megatron_world, small_dataset, tmp_path):
    """The bf16 path (mixed-precision optimizer with fp32 main params) saves and loads back."""
    from mmpretrain.parallel import cuda_to_cpu

    from mmpretrain import checkpoint
    from mmpretrain.model.build import build_model

    cfg = small_cfg(small_dataset, "train.precision=bf16")
    _, tok, (model,), ddps, optimizer, scheduler = setup(cfg)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    loader = make_loader(cfg, "train", tok)
    loss, *_ = train_step(ddps, optimizer, [next(iter(loader))], 128)
    assert math.isfinite(loss)
    with cuda_to_cpu():
        path = checkpoint.save(tmp_path, 1, model, optimizer, scheduler, loader.state_dict(), cfg,
                               consumed_samples=2)
        fresh = build_model(cfg, tok.vocab_size, tok.img_id)
        checkpoint.load_model(path, fresh)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        if torch.is_tensor(a):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_activation_recompute_changes_no_number(megatron_world, small_dataset, recompute):
    """Recomputing activations in backward gives the same loss and gradients as keeping them."""
    from mmpretrain.parallel.full_state import gather_full, load_full

    results = []
    weights = None
    for mode in ("none", recompute):  # the closures below run within their own iteration
        # ruff: noqa: B023
        cfg = small_cfg(small_dataset, f"train.recompute={mode}", "decoder.num_layers=2")
        _, tok, chunks, ddps, optimizer, _ = setup(
            cfg, init_weights=(lambda c: load_full(c, weights)) if weights else None)
        weights = weights or gather_full(chunks)
        batch = next(iter(make_loader(cfg, "train", tok)))
        layer = chunks[0].language_model.block.layers[0]
        watched = layer if recompute == "full" else layer.self_attention.core_attention
        calls = []
        watched.register_forward_hook(lambda *_: calls.append(1))
        grads = {}
        loss, *_ = train_step(ddps, optimizer, [batch], 128,
                              after_backward=lambda: grads.update(gather_full(chunks, grads=True)))
        results.append((loss, grads, len(calls)))
    (loss0, g0, calls0), (loss1, g1, calls1) = results
    assert (calls0, calls1) == (1, 2)  # the recomputing run ran the module again in backward
    assert loss0 == loss1
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-6, atol=1e-9)


def test_decoder_vocab_size_sets_the_model_rows(megatron_world, small_dataset):
    """decoder.vocab_size, when set, is the model's vocabulary (as the planner counts it); fewer
    rows than the tokenizer has ids is a named error."""
    from mmpretrain.config import ConfigError
    from mmpretrain.dataset import open_tokenizer
    from mmpretrain.model.build import padded_vocab_size

    ids = open_tokenizer(small_cfg(small_dataset)).vocab_size
    _, _, (model,), *_ = setup(small_cfg(small_dataset, f"decoder.vocab_size={ids + 300}"))
    assert model.language_model.vocab_size == padded_vocab_size(ids + 300, 1) > padded_vocab_size(ids, 1)
    with pytest.raises(ConfigError, match=f"decoder.vocab_size {ids - 1} is smaller than the {ids}"):
        setup(small_cfg(small_dataset, f"decoder.vocab_size={ids - 1}"))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_non_finite_gradient_skips_the_update(megatron_world, small_dataset, precision):
    """A NaN in one gradient: no weight and no optimizer state moves, the step says so; the next
    finite step updates as usual."""
    cfg = small_cfg(small_dataset, f"train.precision={precision}", "train.lr=1e-3")
    _, tok, (model,), ddps, optimizer, scheduler = setup(cfg)
    scheduler.step(1)  # past the lr-0 first step
    batches = iter(make_loader(cfg, "train", tok))
    before = snapshot(model)

    def poison():
        model.language_model.block.layers[0].mlp.linear_fc2.weight.main_grad[0, 0] = float("nan")

    loss, _, grad_norm, ok = train_step(ddps, optimizer, [next(batches)], 128, after_backward=poison)
    assert not ok and math.isfinite(loss) and math.isnan(grad_norm)
    assert not changed(model, before)
    loss, _, grad_norm, ok = train_step(ddps, optimizer, [next(batches)], 128)
    assert ok and math.isfinite(grad_norm) and changed(model, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_global_batch_with_no_text_token_leaves_the_weights_alone(megatron_world, small_dataset):
    """Image-only samples or samples cut before their text: zero gradients, but Adam's momentum
    and weight decay would move every weight. The update is skipped, the loss is NaN (nothing
    scored), and the skip does not count towards train.max_skipped_steps."""
    from mmpretrain.train.step import SkippedSteps

    cfg = small_cfg(small_dataset, "train.lr=1e-3", "train.weight_decay=0.1")
    _, tok, (model,), ddps, optimizer, scheduler = setup(cfg)
    scheduler.step(1)  # past the lr-0 first step
    batches = iter(make_loader(cfg, "train", tok))
    assert train_step(ddps, optimizer, [next(batches)], 128)[3]  # momentum is now non-zero
    before = snapshot(model)
    batch = next(batches)
    batch.loss_mask = torch.zeros_like(batch.loss_mask)
    loss, tokens, _, ok = train_step(ddps, optimizer, [batch], 128)
    assert not ok and tokens == 0 and math.isnan(loss)
    assert not changed(model, before)
    skipped = SkippedSteps(limit=2, in_a_row=1)
    assert not skipped.count(5, ok, loss, 0.0, tokens) and skipped.in_a_row == 1
    assert skipped.take() == 1
    assert skipped.count(6, False, float("nan"), 0.0, 100.0) and skipped.in_a_row == 2


def test_non_finite_steps_are_counted_then_stop_the_run(megatron_world, small_dataset, tmp_path,
                                                       monkeypatch):
    """Through the loop: skipped steps leave the LR schedule in place and show in the metrics;
    train.max_skipped_steps of them in a row stop the run with DivergedError, after saving the
    weights of the last finite update."""
    import json

    from mmpretrain.parallel import cuda_to_cpu

    import mmpretrain.train.step as step_module
    from mmpretrain import checkpoint
    from mmpretrain.checkpoint.files import checkpoint_root, latest_checkpoint, step_dir
    from mmpretrain.train import DivergedError
    from mmpretrain.train.loop import train

    bad_steps, calls = {2, 3}, [0]
    finite = step_module.loss_func

    def loss_func(mask, per_token):  # one micro-batch per step: call n is step n
        calls[0] += 1
        return finite(mask, per_token * (float("inf") if calls[0] in bad_steps else 1.0))

    monkeypatch.setattr(step_module, "loss_func", loss_func)
    sets = ("train.steps=5", "train.warmup_steps=0", "logging.every=1", "logging.tensorboard=false")
    train(small_cfg(small_dataset, *sets), tmp_path / "a")
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_updates"] for r in records] == [0, 1, 1, 0, 0]
    lrs = [r["lr"] for r in records]
    assert lrs[0] == 1e-3 and lrs[1] == lrs[2] == lrs[3] > lrs[4] == pytest.approx(5.5e-4), lrs
    assert all(math.isfinite(r["loss"]) for r in records if r["skipped_updates"] == 0)

    bad_steps, calls[0] = set(range(3, 99)), 0  # steps 1-2 update, 3-4 do not: the run stops
    cfg = small_cfg(small_dataset, *sets, "train.max_skipped_steps=2", "checkpoint.every=3")
    with pytest.raises(DivergedError, match=r"2 steps in a row \(up to step 4\)"):
        train(cfg, tmp_path / "b")
    assert latest_checkpoint(tmp_path / "b") == step_dir(checkpoint_root(tmp_path / "b"), 4)
    models = []
    for step in (3, 4):  # both hold the weights of step 2, the last update; 4 saved by the stop
        _, _, (model,), *_ = setup(cfg)
        with cuda_to_cpu():
            checkpoint.load_model(step_dir(checkpoint_root(tmp_path / "b"), step), model)
        models.append(model)
    assert not changed(models[1], snapshot(models[0]))
    _, _, (fresh,), *_ = setup(cfg)
    assert changed(fresh, snapshot(models[0]))  # (the loads did load something)

    # a streak across a restart counts as one: 1 skipped by step 3, then 2 more after resuming
    bad_steps, calls[0] = set(range(3, 99)), 0
    cfg = small_cfg(small_dataset, *sets, "train.max_skipped_steps=3", "train.steps=3")
    train(cfg, tmp_path / "c")
    with pytest.raises(DivergedError, match=r"3 steps in a row \(up to step 5\)"):
        train(small_cfg(small_dataset, *sets, "train.max_skipped_steps=3"), tmp_path / "c")



def test_a_finished_run_restarts_without_building_the_model(megatron_world, small_dataset,
                                                             tmp_path, monkeypatch, caplog):
    """A requeue of a run whose latest checkpoint is at train.steps builds and loads nothing (at
    scale that is minutes of loading for no step) and leaves the run directory as it was."""
    import mmpretrain.train.loop as loop

    sets = ("train.steps=2", "logging.tensorboard=false")
    loop.train(small_cfg(small_dataset, *sets), tmp_path)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(loop, "build_state", refuse)
    assert loop.train(small_cfg(small_dataset, *sets), tmp_path) == {}
    assert "step_00000002 is at step 2 and train.steps is 2: nothing to train" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")} == before
    with pytest.raises(AssertionError, match="the model was built"):  # one more step: it builds
        loop.train(small_cfg(small_dataset, "train.steps=3", "logging.tensorboard=false"), tmp_path)


@pytest.mark.parametrize("distributed", ["false", "true"])
def test_an_optimizer_state_of_other_trainable_parameters_is_named(megatron_world, small_dataset,
                                                                   tmp_path, distributed):
    """Resuming after the trainable parameters changed (the vision encoder frozen since) is one
    CheckpointError naming the change (state.json "trains"); for a checkpoint without that
    record, a distributed optimizer's buffers of other sizes are one naming the likely causes."""
    import json

    from mmpretrain.checkpoint import CheckpointError, latest_checkpoint
    from mmpretrain.train.loop import train

    sets = ("logging.tensorboard=false", f"parallel.distributed_optimizer={distributed}")
    train(small_cfg(small_dataset, "train.steps=1", *sets), tmp_path / "run")
    frozen = small_cfg(small_dataset, "train.steps=2", "vision.freeze=true", *sets)
    with pytest.raises(CheckpointError, match="the vision encoder trained when saved and is "
                                              "frozen now"):
        train(frozen, tmp_path / "run")
    if distributed == "true":
        state = latest_checkpoint(tmp_path / "run") / "state.json"
        meta = json.loads(state.read_text())
        del meta["trains"]  # as saved before the record
        state.write_text(json.dumps(meta))
        with pytest.raises(CheckpointError, match="does not fit this run's trainable parameters"):
            train(frozen, tmp_path / "run")


@pytest.mark.parametrize("distributed", ["false", "true"])
def test_changed_optimizer_groups_are_named(megatron_world, small_dataset, tmp_path, distributed):
    """megatron-core matches saved parameter groups to the run's by their multipliers: an X run
    resumed with another cross-attention gate learning-rate multiplier is one CheckpointError
    naming the setting (it was a KeyError or a list-merge error from megatron-core)."""
    from mmpretrain.checkpoint import CheckpointError
    from mmpretrain.train.loop import train

    sets = ("logging.tensorboard=false", f"parallel.distributed_optimizer={distributed}",
            "model.design=x", "model.cross_attention_every=1")
    train(small_cfg(small_dataset, "train.steps=1", "model.cross_attention_gate_lr_mult=1", *sets),
          tmp_path / "run")
    with pytest.raises(CheckpointError, match="model.cross_attention_gate_lr_mult change"):
        train(small_cfg(small_dataset, "train.steps=2", "model.cross_attention_gate_lr_mult=20",
                        *sets), tmp_path / "run")
