"""Layout functions of the Hugging Face mapping, each against the code it must agree with:
megatron-core's fused QKV and interleaved RoPE, transformers' Pixtral rotary and activations."""
import pytest
import torch
import torch.nn.functional as F

from mmpretrain.hf import ConversionError
from mmpretrain.hf.mapping import (
    canonical_name,
    fuse_fc1,
    fuse_qkv,
    half_to_interleaved,
    interleaved_to_half,
    rope_to_half,
    split_fc1,
    split_qkv,
)
from mmpretrain.hf.shards import parse_size, plan_shards
from mmpretrain.model.rope import text_rope, vision_rope


def test_qkv_split_follows_megatron_groups():
    heads, groups, d, h = 4, 2, 3, 5
    # row r of megatron's fused weight, filled with r: [g0 q0 q1 k v | g1 q2 q3 k v] x d rows
    qkv = torch.arange(groups * (heads // groups + 2) * d).float()[:, None].expand(-1, h)
    q, k, v = split_qkv(qkv, heads, groups, d)
    assert q.shape == (heads * d, h) and k.shape == v.shape == (groups * d, h)
    per_group = (heads // groups + 2) * d
    assert q[d * 2, 0] == per_group  # query head 2 is the first query of group 1
    assert k[0, 0] == 2 * d and v[0, 0] == 3 * d and k[d, 0] == per_group + 2 * d
    assert torch.equal(fuse_qkv(q, k, v, heads, groups, d), qkv)


def test_fc1_is_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    (fc1,) = fuse_fc1(gate, up)
    x = torch.randn(4)
    # megatron's gated MLP: silu(first half) * second half
    a, b = (fc1 @ x).chunk(2)
    torch.testing.assert_close(F.silu(a) * b, F.silu(gate @ x) * (up @ x))
    assert all(torch.equal(s, t) for s, t in zip(split_fc1(fc1), (gate, up)))


def test_rope_permutation_maps_interleaved_pixtral_rope_to_hf():
    """Our rows through megatron's interleaved RoPE equal HF Pixtral's rotate-half RoPE applied
    to the permuted rows, for 2-D positions; so q.k (attention) is the same on both sides."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from transformers import PixtralVisionConfig
    from transformers.models.pixtral.modeling_pixtral import PixtralRotaryEmbedding, apply_rotary_pos_emb

    heads, d, theta, side = 2, 16, 100.0, 8
    pos = torch.tensor([[r, c] for r in range(3) for c in range(5)])  # [n, 2] (row, col)
    q, k = torch.randn(2, len(pos), 1, heads, d).unbind(0)  # [n, 1, heads, d], our row order
    ours = [_apply_rotary_pos_emb_bshd(t, vision_rope(pos, d, theta), rotary_interleaved=True)
            for t in (q, k)]
    rope = PixtralRotaryEmbedding(PixtralVisionConfig(hidden_size=heads * d, num_attention_heads=heads,
                                                      image_size=side * 4, patch_size=4, rope_theta=theta))
    cos, sin = rope(q, pos[:, 0] * side + pos[:, 1])  # [n, d]
    perm = rope_to_half(d)
    to_hf = [t[:, 0, :, perm].transpose(0, 1)[None] for t in (q, k)]  # [1, heads, n, d]
    hf_q, hf_k = apply_rotary_pos_emb(*to_hf, cos, sin, unsqueeze_dim=0)
    torch.testing.assert_close(hf_q[0].transpose(0, 1), ours[0][:, 0, :, perm])
    torch.testing.assert_close(hf_q @ hf_k.transpose(-1, -2),
                               (ours[0][:, 0].transpose(0, 1) @ ours[1][:, 0].permute(1, 2, 0))[None])
    # and without the permutation they disagree
    wrong, _ = apply_rotary_pos_emb(q[:, 0].transpose(0, 1)[None], to_hf[1], cos, sin, unsqueeze_dim=0)
    assert not torch.allclose(wrong[0].transpose(0, 1), ours[0][:, 0, :, perm], atol=1e-3)


def test_rope_permutation_of_weights_round_trips():
    w = torch.randn(2 * 16, 7)
    assert torch.equal(half_to_interleaved(interleaved_to_half(w, 2, 16), 2, 16), w)
    assert rope_to_half(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_decoder_rope_is_rotate_half_like_llama():
    """No permutation on the decoder: our text RoPE angles are HF Llama's cos/sin layout."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d, theta = 16, 500.0
    pos = torch.arange(11)[None]
    ours = text_rope(pos, d, theta)[:, 0, 0]  # [s, d]
    conf = LlamaConfig(hidden_size=4 * d, num_attention_heads=4, rope_theta=theta)
    cos, sin = LlamaRotaryEmbedding(conf)(torch.zeros(1), pos)
    torch.testing.assert_close(ours.cos(), cos[0])
    torch.testing.assert_close(ours.sin(), sin[0])


def test_projector_gelu_is_exact_gelu():
    from transformers.activations import ACT2FN

    x = torch.linspace(-5, 5, 101)
    assert torch.equal(ACT2FN["gelu"](x), F.gelu(x))


def test_canonical_names():
    assert canonical_name("model.language_model.layers.0.mlp.up_proj.weight", "llava") == \
        "language_model.model.layers.0.mlp.up_proj.weight"
    assert canonical_name("lm_head.weight", "llava") == "language_model.lm_head.weight"
    assert canonical_name("language_model.lm_head.weight", "llava") == "language_model.lm_head.weight"
    assert canonical_name("model.norm.weight", "causal_lm") == "language_model.model.norm.weight"
    assert canonical_name("patch_conv.weight", "pixtral") == "vision_tower.patch_conv.weight"


def test_shard_planning():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2KiB") == 2048 and parse_size("100") == 100
    with pytest.raises(ConversionError, match="--shard-size"):
        parse_size("big")
    assert plan_shards([4, 4, 4, 10, 1], 8) == [[0, 1], [2], [3], [4]]


@pytest.mark.parametrize("settings, fmt", [
    ([], "llava"),
    (["projector.merge=2"], "nvlm"),
    (["projector.hidden_size=96"], "nvlm"),
    (["data.resize=tiles"], "nvlm"),
    (["model.design=x", "model.cross_attention_every=1"], "nvlm"),
    (["model.design=h", "model.cross_attention_every=1", "data.resize=tiles"], "nvlm"),
])
def test_export_format_llava_or_remote_code(settings, fmt):
    from mmpretrain.config import load
    from mmpretrain.hf.configs import check_exportable

    assert check_exportable(load(None, settings)) == fmt


def test_vision_norm_eps_other_than_pixtrals_is_refused():
    from mmpretrain.config import load
    from mmpretrain.hf.configs import check_exportable

    with pytest.raises(ConversionError, match="vision.norm_eps"):
        check_exportable(load(None, ["vision.norm_eps=1e-6"]))


@pytest.mark.parametrize("settings", [
    [], ["data.image_token_budget=50"], ["projector.merge=2"],
    ["projector.merge=2", "data.image_token_budget=4096", "vision.patch_size=14"],
    ["data.max_image_side=20"], ["data.max_image_side=100", "projector.merge=2"],
    ["data.max_image_side=3"],
])
def test_rope_table_covers_every_native_grid(settings):
    """`rope_table_side` is the longest side `native_size` gives any image (thin ones take the
    whole budget along their length): reached, never exceeded."""
    from mmpretrain.data.resize import native_size

    from mmpretrain.config import load
    from mmpretrain.hf.configs import rope_table_side

    cfg = load(None, settings)
    p = cfg.vision.patch_size
    longest = max(max(native_size(h, w, p, cfg.data.image_token_budget, cfg.projector.merge,
                                  cfg.data.max_upscale, cfg.data.max_image_side))
                  for h in (1, 3, 17, 100, 1000, 10**5) for w in (1, 5, 64, 999, 10**6))
    assert rope_table_side(cfg) == longest
