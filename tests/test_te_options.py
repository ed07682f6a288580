"""Opt-in Transformer Engine options, refused without the TE spec. train.gradient_accumulation_fusion:
TE's linears add their weight gradients into the fp32 buffer inside the GEMM; megatron's own
linears (output layer, projector) are built without it; on a GPU the gradients equal those of the
separate add. model.te_fused_mlp: its logits are checked in test_gpu_te.py."""
import pytest
import torch
from megatron.core import tensor_parallel
from megatron.core.transformer.mlp import MLP
from mmpretrain.parallel import destroy_distributed
from test_cross_attention import config

from mmpretrain.config import ConfigError, check_trainable, load
from mmpretrain.dataset import make_loader
from mmpretrain.model.build import build_model
from mmpretrain.model.specs import transformer_config, without_wgrad_fusion
from mmpretrain.model.te_specs import te_unavailable
from mmpretrain.train.loop import setup
from mmpretrain.train.step import train_step


@pytest.mark.parametrize("option", ["train.gradient_accumulation_fusion", "model.te_fused_mlp"])
def test_refused_without_the_te_spec(option):
    cfg = config("d", spec="local")
    section, name = option.split(".")
    setattr(getattr(cfg, section), name, True)
    with pytest.raises(ConfigError, match=rf"{option}: .*this run has the local spec"):
        check_trainable(cfg)


def test_fused_mlp_refused_with_fp8_and_full_recomputation():
    with pytest.raises(ConfigError, match="model.te_fused_mlp: not with train.fp8 and "
                                          "train.recompute: full"):
        load(None, ["model.te_fused_mlp=true", "train.fp8=hybrid", "train.recompute=full"])


def test_a_local_build_of_a_te_run_leaves_them_out(megatron_world):
    """HF export and CPU evaluation build a TE run's config with the local spec: neither option
    reaches megatron's own layers there (its linears would refuse the fusion without apex)."""
    cfg = config("d", spec="local")
    cfg.train.gradient_accumulation_fusion = cfg.model.te_fused_mlp = True
    model = build_model(cfg, vocab_size=160, image_token_id=4)
    layer = model.language_model.block.layers[0]
    assert not layer.config.gradient_accumulation_fusion
    assert not model.vision.config.gradient_accumulation_fusion
    assert type(layer.mlp) is MLP


@pytest.mark.skipif(tensor_parallel.layers._grad_accum_fusion_available,
                    reason="apex's fused_weight_gradient_mlp_cuda is installed here")
def test_megatron_linears_are_built_without_it(megatron_world):
    """megatron's ColumnParallelLinear refuses the flag without apex's extension; the config
    `without_wgrad_fusion` gives it builds, and differs from the layers' only in that flag."""
    tcfg = transformer_config(num_layers=2, hidden_size=64, num_attention_heads=4,
                              ffn_hidden_size=128, norm_eps=1e-5, init_std=0.02,
                              dtype=torch.float32, tp=1, pp=1, wgrad_fusion=True)
    with pytest.raises(RuntimeError, match="gradient_accumulation_fusion"):
        tensor_parallel.ColumnParallelLinear(64, 32, config=tcfg, init_method=tcfg.init_method,
                                             bias=False, gather_output=False)
    plain = without_wgrad_fusion(tcfg)
    assert not plain.gradient_accumulation_fusion and tcfg.gradient_accumulation_fusion
    assert {**vars(plain), "gradient_accumulation_fusion": True} == vars(tcfg)
    assert without_wgrad_fusion(plain) is plain
    tensor_parallel.ColumnParallelLinear(64, 32, config=plain, init_method=plain.init_method,
                                         bias=False, gather_output=False)


def step_gradients(base: list[str]) -> tuple[float, torch.Tensor, int]:
    """(loss, every fp32 gradient buffer concatenated, parameters whose gradients TE added to
    the buffer itself) of one step of two micro-batches."""
    cfg = load(None, base)
    _, tok, chunks, ddps, optimizer, _ = setup(cfg, world_size=1)
    loader = iter(make_loader(cfg, "train", tok))
    grads, fused = [], []

    def capture():
        grads.extend(b.grad_data.clone() for d in ddps for b in d.buffers)
        fused.extend(getattr(p, "grad_added_to_main_grad", False) for c in chunks
                     for p in c.parameters())

    loss, *_ = train_step(ddps, optimizer, [next(loader), next(loader)], cfg.data.seq_length,
                          after_backward=capture)
    destroy_distributed()
    return loss, torch.cat(grads), sum(fused)


@pytest.mark.skipif(te_unavailable() is not None,
                    reason=f"needs Transformer Engine on CUDA: {te_unavailable()}")
def test_gradients_equal_the_separate_add(small_dataset):
    """Two micro-batches of a 2-layer D model (bf16, TE spec) from the same init: the loss is the
    same and the accumulated gradients agree to bf16 rounding of each micro-batch's gradient (the
    fused GEMM adds in fp32 where the separate add first rounds to bf16)."""
    base = [f"data.path={small_dataset}", "model.spec=te", "train.precision=bf16",
            "decoder.num_layers=2", "decoder.hidden_size=128", "decoder.ffn_hidden_size=256",
            "vision.hidden_size=64", "vision.ffn_hidden_size=128", "data.seq_length=256",
            "data.micro_batch_size=2", "train.global_batch_size=4"]
    loss, grads, plain_added = step_gradients(base)
    fused_loss, fused, added = step_gradients([*base, "train.gradient_accumulation_fusion=true"])
    assert plain_added == 0 and added > 0  # TE's linears added into the buffer only when asked
    assert fused_loss == pytest.approx(loss, rel=1e-6)
    assert (fused - grads).abs().max() <= 2 ** -7 * grads.abs().max()
