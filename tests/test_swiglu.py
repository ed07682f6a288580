"""The MLPs' SwiGLU: the same numbers as megatron's unfused GLU, with only FC1's output kept."""
import pytest
import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP

from mmpretrain.model.swiglu import SwiGLU, _SwiGLU


def unfused(y: torch.Tensor) -> torch.Tensor:
    """megatron-core's GLU without fusion (mlp.py: silu(x_glu) * (x_linear + glu_linear_offset))."""
    gate, up = torch.chunk(y, 2, dim=-1)
    return F.silu(gate) * (up + 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outputs_and_gradients_bit_identical_to_megatrons_glu(dtype):
    g = torch.Generator().manual_seed(0)
    y = (3 * torch.randn(5, 2, 48, generator=g)).to(dtype)
    grad = torch.randn(5, 2, 24, generator=g).to(dtype)
    ours, theirs = y.clone().requires_grad_(), y.clone().requires_grad_()
    out_ours, out_theirs = _SwiGLU.apply(ours), unfused(theirs)
    assert torch.equal(out_ours, out_theirs)
    out_ours.backward(grad)
    out_theirs.backward(grad)
    assert torch.equal(ours.grad, theirs.grad)


def saved_bytes(fn, y: torch.Tensor) -> int:
    """Bytes of the storages autograd keeps for fn(y)'s backward, each storage once."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(y)
    return sum(kept.values())


def test_keeps_only_fc1s_output():
    y = torch.randn(64, 2, 96, requires_grad=True)  # FC1's output: 2f = 96
    assert saved_bytes(_SwiGLU.apply, y) == y.nbytes
    assert saved_bytes(unfused, y) == 2 * y.nbytes  # + the SiLU's output and the linear half


def test_every_mlp_of_the_built_models_uses_it(megatron_world):
    from tests.test_cross_attention import build, config

    for design in "dxh":
        model = build(config(design))
        mlps = [m for m in model.modules() if isinstance(m, MLP)]
        # encoder and decoder layers, and the cross-attention layers of X and H
        assert len(mlps) == model.vision.config.num_layers + 2 + (2 if design != "d" else 0)
        assert all(isinstance(m.activation_func, SwiGLU) for m in mlps)
