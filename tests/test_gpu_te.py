"""Transformer Engine on a GPU (skipped elsewhere, with the reason): the TE spec against the local
spec from the same weights, TE's thd attention against the local dense mask, FP8 training
against bf16 over 50 steps, and the held-out evaluation leaving bf16 and FP8 training alone."""
import re
from contextlib import contextmanager

import pytest
import torch
from mmpretrain.data.packing import pack_rows
from mmpretrain.parallel import destroy_distributed
from mmpretrain.parallel.full_state import gather_full, load_full
from test_cross_attention import SEQ, config, seq_h, seq_x, set_gates

from mmpretrain.config import load
from mmpretrain.dataset import make_loader
from mmpretrain.model.build import build_model
from mmpretrain.model.te_specs import fp8_unavailable, te_unavailable
from mmpretrain.train import fp8_state, validate
from mmpretrain.train.loop import setup
from mmpretrain.train.step import train_step
from mmpretrain.train.validate import HeldoutLoss

pytestmark = pytest.mark.skipif(te_unavailable() is not None,
                                reason=f"needs Transformer Engine on CUDA: {te_unavailable()}")
_FUSED_NORM = re.compile(r"(\.layers\.\d+\.)(input_layernorm|pre_mlp_layernorm)\.weight$")


def te_name(local: str) -> str:
    """A local-spec parameter name in the TE spec, whose layers fuse the norms into the linears."""
    m = _FUSED_NORM.search(local)
    if not m:
        return local
    fused = "self_attention.linear_qkv" if m.group(2) == "input_layernorm" else "mlp.linear_fc1"
    return local[:m.start()] + f"{m.group(1)}{fused}.layer_norm_weight"


def batch_of(design: str):
    if design == "h":
        seqs = [seq_h("hi", (2, 2), "yo", seed=1), seq_h("abc", "de"), seq_h("q", (2, 2), "z", seed=5)]
    else:
        seqs = [seq_x("hello", (2, 2), "there"), seq_x("abc", "de"), seq_x("", (4, 2), (2, 2), "xyz")]
    return pack_rows([seqs[:2], seqs[2:]], SEQ, 0).to("cuda")


def built(cfg):
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=160, image_token_id=4).eval()


def te_against_local(design: str, local_packing: str, fused_mlp: bool = False) -> float:
    """Largest difference of the TE spec's bf16 logits from the local spec's (same weights), as a
    share of the logits' range."""
    cfg = config(design, spec="local", packed_attention=local_packing)
    if design == "h":
        cfg.data.resize = "tiles"
    # head dims of 16 (flash attention and cuDNN take multiples of 8)
    cfg.vision.hidden_size, cfg.vision.ffn_hidden_size = 64, 128
    cfg.decoder.hidden_size, cfg.decoder.ffn_hidden_size = 128, 256
    local = built(cfg)
    set_gates(local, 0.5)
    cfg.model.spec, cfg.model.packed_attention, cfg.model.te_fused_mlp = "te", "thd", fused_mlp
    te = built(cfg)
    full = gather_full([local])
    load_full([te], {te_name(k): v for k, v in full.items()})
    batch = batch_of(design)
    ref, got = local(batch, with_loss=False).float(), te(batch, with_loss=False).float()
    keep = batch.sample_ids >= 0
    return float((got - ref)[keep].abs().max() / ref[keep].abs().max())


@pytest.mark.parametrize("local_packing", ["mask", "thd"])
@pytest.mark.parametrize("design", ["x", "h"])
@torch.no_grad()
def test_te_spec_matches_local_spec(megatron_world, design, local_packing):
    """bf16 logits of the TE spec (thd, flash/cuDNN attention, fused norm+linear) from the local
    spec's weights, against the local spec: within 2% of the logits' range."""
    err = te_against_local(design, local_packing)
    assert err <= 2e-2, f"TE vs local ({local_packing}) logits differ by {err:.3%} of their range"


@pytest.mark.parametrize("design", ["x", "h"])
@torch.no_grad()
def test_te_fused_mlp_matches_local_spec(megatron_world, design):
    """model.te_fused_mlp (megatron's TEFusedMLP: each MLP through TE's operation fuser, TE's
    SwiGLU kernel) loads the same weights and gives the local spec's logits within 2%."""
    err = te_against_local(design, "thd", fused_mlp=True)
    assert err <= 2e-2, f"TE fused MLP vs local logits differ by {err:.3%} of their range"


def train_losses(base: list[str], steps: int, eval_every: int = 0) -> list[float]:
    """Training losses of `steps` steps, with the held-out loss taken every `eval_every` steps
    (as the training loop does) when it is not 0."""
    cfg = load(None, base)
    _, tok, chunks, ddps, optimizer, scheduler = setup(cfg, world_size=1)
    loader = iter(make_loader(cfg, "train", tok))
    heldout = HeldoutLoss(make_loader(cfg, "heldout", tok, shuffle=False), 16, 0, 1) if eval_every else None
    losses = []
    for step in range(1, steps + 1):
        loss, *_ = train_step(ddps, optimizer, [next(loader)], cfg.data.seq_length)
        scheduler.step(1)
        losses.append(loss)
        if heldout is not None and step % eval_every == 0:
            heldout(ddps, cfg.data.seq_length)
    destroy_distributed()
    return losses


def small_te(data) -> list[str]:
    """A 4-layer D model (hidden 256) on the TE spec, 50 steps of 2 rows of 256 tokens."""
    return [f"data.path={data}", "model.spec=te", "decoder.num_layers=4",
            "decoder.hidden_size=256", "decoder.ffn_hidden_size=768", "vision.hidden_size=128",
            "vision.ffn_hidden_size=256", "data.seq_length=256", "data.micro_batch_size=2",
            "train.global_batch_size=2", "train.steps=50", "train.warmup_steps=5"]


@pytest.mark.parametrize("recipe", ["delayed", "tensorwise"])
def test_fp8_loss_tracks_bf16(small_dataset, recipe):
    """50 steps of a 4-layer D model (hidden 256) in FP8 against bf16 from the same init and
    batches. The first loss agrees within 0.5% (the FP8 forward pass is right); both learn; the
    mean of the last 10 within 10% of bf16's. Measured on an H100 (TE 2.11; runs repeat
    exactly): first losses 6.321 / 6.322, last-10 means +3.5% (delayed) and +2.0% (tensorwise)
    above bf16's 1.534. Small numeric changes move them by a few percent (with megatron's
    unfused RoPE in place of TE's kernel: +5.4% and -0.2%), so the bound is not tighter."""
    if fp8_unavailable(recipe):
        pytest.skip(fp8_unavailable(recipe))
    base = small_te(small_dataset)
    bf16 = train_losses(base, 50)
    fp8 = train_losses([*base, "train.fp8=hybrid", f"train.fp8_recipe={recipe}"], 50)
    late_bf16, late_fp8 = sum(bf16[-10:]) / 10, sum(fp8[-10:]) / 10
    assert abs(fp8[0] - bf16[0]) <= 5e-3 * bf16[0], (bf16[0], fp8[0])
    assert late_bf16 < 0.3 * bf16[0] and late_fp8 < 0.3 * fp8[0], (bf16, fp8)
    assert abs(late_fp8 - late_bf16) <= 0.1 * late_bf16, (bf16, fp8)


@pytest.mark.parametrize("recipe, fused_mlp", [(None, False), ("delayed", False),
                                               ("tensorwise", False), ("delayed", True)])
def test_evaluation_leaves_training_alone(small_dataset, recipe, fused_mlp, monkeypatch):
    """The held-out loss taken every 2 steps changes no training loss, in bf16 and in FP8 (with
    TE's operation fuser for the MLP too). Under delayed scaling the evaluation's forward passes
    record their amax in TE's amax histories (seen here before HeldoutLoss restores them), which
    would scale the next training steps differently. A repeat of the run without evaluation must
    give the same losses first (the runs are deterministic), so that a difference is the
    evaluation's."""
    if recipe and fp8_unavailable(recipe):
        pytest.skip(fp8_unavailable(recipe))
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")
    base = small_te(small_dataset) + [f"model.te_fused_mlp={str(fused_mlp).lower()}"]
    base += ["train.fp8=hybrid", f"train.fp8_recipe={recipe}"] if recipe else []
    plain = train_losses(base, 8)
    assert train_losses(base, 8) == plain, "the same run twice gave other losses"

    recorded = []  # per evaluation: FP8 scaling tensors found, and whether the evaluation wrote any
    kept = validate.fp8_scaling_kept

    @contextmanager
    def watched(modules):
        with kept(modules):
            before = [t.clone() for t in fp8_state.fp8_scaling_tensors(modules)]
            yield
            after = fp8_state.fp8_scaling_tensors(modules)
            recorded.append((len(before), any(not torch.equal(a, b) for a, b in zip(before, after))))
    monkeypatch.setattr(validate, "fp8_scaling_kept", watched)
    assert train_losses(base, 8, eval_every=2) == plain
    assert len(recorded) == 4
    if recipe == "delayed":  # the state exists, and each evaluation wrote into it
        assert all(n > 0 and wrote for n, wrote in recorded), recorded
