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
