"""Tensor names and layouts: our megatron model (TP=1, PP=1 state dict) <-> LLaVA/Pixtral on disk.

Every weight belongs to one `Group`: a few of our tensors, the Hugging Face tensors they become,
and the two layout functions between them (pure reshapes and permutations, so a round trip is
exact). The Hugging Face names are the on-disk names `LlavaForConditionalGeneration.save_pretrained`
writes in transformers 4.57 (`vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`); other spellings are brought to these by `canonical_name`.

Layouts (checked against megatron-core 0.16.1 and transformers 4.57.6):
- megatron's fused `linear_qkv.weight` rows are `[groups, heads/groups + 2, head_dim]`: a group's
  queries, then its key, then its value. Query head `g * heads/groups + i` uses key/value head `g`,
  which is how Llama's grouped-query attention pairs them.
- `linear_fc1.weight` of the gated MLP is `cat(gate, up)` (megatron's GLU takes `chunk(2)[0]`
  through the activation).
- The vision encoder rotates interleaved pairs (dims `2j, 2j+1` turn together by angle `a_j`;
  `rotary_interleaved=True`), HF Pixtral rotates halves (dims `j, j + d/2` by the same `a_j`: its
  2-D table is `cat(row freqs, col freqs)` repeated twice, and ours is the same `a_j` with pairs
  `0..d/4-1` on the row, `d/4..d/2-1` on the column). So within each head HF row `j` is our row
  `2j` and HF row `j + d/2` is our row `2j + 1`: q and k rows are de-interleaved on the way out
  (`rope_to_half`) and interleaved on the way in. q.k is unchanged because both move alike.
- The decoder uses megatron's non-interleaved (rotate-half) RoPE, the same as HF Llama: no
  permutation.
- Our patch embedding is a Linear over flattened `(c, y, x)` patches: HF's Conv2d weight
  `[h, 3, p, p]` reshaped to `[h, 3*p*p]`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmpretrain.config import Config
from mmpretrain.hf import ConversionError

Tensors = tuple[torch.Tensor, ...]

VISION, PROJECTOR, DECODER = "vision", "projector", "decoder"
EMBED = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"


@dataclass(frozen=True)
class Dims:
    """The sizes the layout functions need."""

    vision_layers: int
    vision_heads: int
    vision_head_dim: int
    patch_size: int
    decoder_layers: int
    decoder_heads: int
    decoder_groups: int
    decoder_head_dim: int

    @classmethod
    def of(cls, cfg: Config) -> Dims:
        """The sizes of a job config's model."""
        v, d = cfg.vision, cfg.decoder
        return cls(v.num_layers, v.num_attention_heads, v.hidden_size // v.num_attention_heads,
                   v.patch_size, d.num_layers, d.num_attention_heads, d.num_query_groups,
                   d.hidden_size // d.num_attention_heads)


# ---------------------------------------------------------------- layout functions


def split_qkv(qkv: torch.Tensor, heads: int, groups: int, head_dim: int) -> Tensors:
    """megatron [groups * (heads/groups + 2) * d, h] -> q [heads*d, h], k, v [groups*d, h]."""
    per = heads // groups
    x = qkv.reshape(groups, per + 2, head_dim, -1)  # [g, per+2, d, h]
    hidden = x.shape[-1]
    return (x[:, :per].reshape(heads * head_dim, hidden),
            x[:, per].reshape(groups * head_dim, hidden),
            x[:, per + 1].reshape(groups * head_dim, hidden))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, groups: int,
             head_dim: int) -> torch.Tensor:
    """q [heads*d, h], k, v [groups*d, h] -> megatron's fused [groups * (heads/groups + 2) * d, h]."""
    per, hidden = heads // groups, q.shape[-1]
    parts = (q.reshape(groups, per, head_dim, hidden), k.reshape(groups, 1, head_dim, hidden),
             v.reshape(groups, 1, head_dim, hidden))
    return torch.cat(parts, dim=1).reshape(-1, hidden)  # [g * (per+2) * d, h]


def rope_to_half(head_dim: int) -> torch.Tensor:
    """Row order within a head: HF (rotate-half) row j <- our (interleaved) row rope_to_half(d)[j]."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _permute_heads(w: torch.Tensor, heads: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the rows of each head of a [heads*d, h] projection by `order` [d]."""
    d = order.numel()
    x = w.reshape(heads, d, -1)  # [heads, d, h]
    return x.index_select(1, order.to(w.device)).reshape(heads * d, -1)


def interleaved_to_half(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """q/k rows from our interleaved-pair RoPE layout to HF's rotate-half layout."""
    return _permute_heads(w, heads, rope_to_half(head_dim))


def half_to_interleaved(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The inverse of `interleaved_to_half`."""
    return _permute_heads(w, heads, torch.argsort(rope_to_half(head_dim)))


def split_fc1(fc1: torch.Tensor) -> Tensors:
    """megatron's gated fc1 [2*f, h] -> gate [f, h], up [f, h]."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def fuse_fc1(gate: torch.Tensor, up: torch.Tensor) -> Tensors:
    """gate, up [f, h] -> megatron's fc1 [2*f, h]."""
    return (torch.cat([gate, up], dim=0),)


def patch_to_conv(w: torch.Tensor, patch: int) -> Tensors:
    """Our patch Linear [h, 3*p*p] over (c, y, x) -> HF Conv2d [h, 3, p, p]."""
    return (w.reshape(w.shape[0], 3, patch, patch),)


def conv_to_patch(w: torch.Tensor) -> Tensors:
    """HF Conv2d [h, 3, p, p] -> our patch Linear [h, 3*p*p]."""
    return (w.reshape(w.shape[0], -1),)


def _same(*tensors: torch.Tensor) -> Tensors:
    return tensors


# ---------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    """Some of our tensors <-> some HF tensors, with the layout functions both ways."""

    part: str  # VISION, PROJECTOR or DECODER
    ours: tuple[str, ...]
    hf: tuple[str, ...]
    to_hf: Callable[..., Tensors] = _same
    from_hf: Callable[..., Tensors] = _same

    @property
    def label(self) -> str:
        """A short name for progress and errors."""
        return self.hf[0].rsplit(".", 1)[0]


def _rename(part: str, ours: str, hf: str) -> Group:
    return Group(part, (ours,), (hf,))


def _attention(part: str, ours: str, hf: str, heads: int, groups: int, head_dim: int,
               rope_interleaved: bool) -> Group:
    """Fused QKV <-> q/k/v projections; q and k de-interleaved for a Pixtral tower."""

    def to_hf(qkv):
        q, k, v = split_qkv(qkv, heads, groups, head_dim)
        if rope_interleaved:
            q, k = interleaved_to_half(q, heads, head_dim), interleaved_to_half(k, groups, head_dim)
        return q, k, v

    def from_hf(q, k, v):
        if rope_interleaved:
            q, k = half_to_interleaved(q, heads, head_dim), half_to_interleaved(k, groups, head_dim)
        return (fuse_qkv(q, k, v, heads, groups, head_dim),)

    names = tuple(f"{hf}.{x}_proj.weight" for x in "qkv")
    return Group(part, (f"{ours}.linear_qkv.weight",), names, to_hf, from_hf)


def _mlp(part: str, ours: str, hf: str) -> Group:
    return Group(part, (f"{ours}.linear_fc1.weight",),
                 (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"), split_fc1, fuse_fc1)


def vision_groups(d: Dims) -> list[Group]:
    """Our `vision.*` <-> `vision_tower.*` (PixtralVisionModel)."""
    p = d.patch_size
    out = [Group(VISION, ("vision.patch_embed.weight",), ("vision_tower.patch_conv.weight",),
                 lambda w: patch_to_conv(w, p), conv_to_patch),
           _rename(VISION, "vision.ln_pre.weight", "vision_tower.ln_pre.weight")]
    for i in range(d.vision_layers):
        ours, hf = f"vision.block.layers.{i}", f"vision_tower.transformer.layers.{i}"
        out += [
            _rename(VISION, f"{ours}.input_layernorm.weight", f"{hf}.attention_norm.weight"),
            _attention(VISION, f"{ours}.self_attention", f"{hf}.attention", d.vision_heads,
                       d.vision_heads, d.vision_head_dim, rope_interleaved=True),
            _rename(VISION, f"{ours}.self_attention.linear_proj.weight", f"{hf}.attention.o_proj.weight"),
            _rename(VISION, f"{ours}.pre_mlp_layernorm.weight", f"{hf}.ffn_norm.weight"),
            _mlp(VISION, f"{ours}.mlp", f"{hf}.feed_forward"),
            _rename(VISION, f"{ours}.mlp.linear_fc2.weight", f"{hf}.feed_forward.down_proj.weight"),
        ]
    return out


def projector_groups() -> list[Group]:
    """Our `projector.linear_{1,2}` <-> `multi_modal_projector.linear_{1,2}` (GELU between)."""
    return [_rename(PROJECTOR, f"projector.linear_{i}.{w}", f"multi_modal_projector.linear_{i}.{w}")
            for i in (1, 2) for w in ("weight", "bias")]


def decoder_groups(d: Dims) -> list[Group]:
    """Our `language_model.*` <-> `language_model.{model.*, lm_head}` (LlamaForCausalLM)."""
    out = [_rename(DECODER, "language_model.embedding.word_embeddings.weight", EMBED)]
    for i in range(d.decoder_layers):
        ours, hf = f"language_model.block.layers.{i}", f"language_model.model.layers.{i}"
        out += [
            _rename(DECODER, f"{ours}.input_layernorm.weight", f"{hf}.input_layernorm.weight"),
            _attention(DECODER, f"{ours}.self_attention", f"{hf}.self_attn", d.decoder_heads,
                       d.decoder_groups, d.decoder_head_dim, rope_interleaved=False),
            _rename(DECODER, f"{ours}.self_attention.linear_proj.weight", f"{hf}.self_attn.o_proj.weight"),
            _rename(DECODER, f"{ours}.pre_mlp_layernorm.weight", f"{hf}.post_attention_layernorm.weight"),
            _mlp(DECODER, f"{ours}.mlp", f"{hf}.mlp"),
            _rename(DECODER, f"{ours}.mlp.linear_fc2.weight", f"{hf}.mlp.down_proj.weight"),
        ]
    out += [_rename(DECODER, "language_model.block.final_layernorm.weight",
                    "language_model.model.norm.weight"),
            _rename(DECODER, "language_model.output_layer.weight", LM_HEAD)]
    return out


def llava_groups(d: Dims) -> list[Group]:
    """The whole D model at native resolution <-> LlavaForConditionalGeneration."""
    return vision_groups(d) + projector_groups() + decoder_groups(d)


def model_tensors(state_dict: dict) -> dict[str, torch.Tensor]:
    """Our state dict without megatron's `_extra_state` entries."""
    return {k: v for k, v in state_dict.items() if not k.endswith("_extra_state")}


def check_covers(groups: list[Group], names) -> None:
    """Every tensor of our model belongs to exactly one group, and every group's tensors exist."""
    mapped = [n for g in groups for n in g.ours]
    missing, unmapped = set(mapped) - set(names), set(names) - set(mapped)
    if missing or unmapped or len(mapped) != len(set(mapped)):
        raise ConversionError(f"the LLaVA mapping does not fit this model: unmapped "
                              f"{sorted(unmapped)[:3]}, missing {sorted(missing)[:3]}")


# ---------------------------------------------------------------- HF name spellings


# Prefixes of the newer in-memory spelling (transformers >= 4.52) -> the on-disk one.
_LLAVA_PREFIXES = (("model.vision_tower.", "vision_tower."),
                   ("model.multi_modal_projector.", "multi_modal_projector."),
                   ("model.language_model.", "language_model.model."),
                   ("lm_head.", "language_model.lm_head."))
_CAUSAL_LM_PREFIXES = (("model.", "language_model.model."), ("lm_head.", "language_model.lm_head."))


def canonical_name(name: str, kind: str) -> str | None:
    """An HF tensor name in the on-disk LLaVA spelling; `kind` is the source: 'llava',
    'causal_lm' (LlamaForCausalLM / MistralForCausalLM) or 'pixtral' (PixtralVisionModel)."""
    if kind == "pixtral":
        for prefix in ("model.vision_tower.", "vision_tower.", "vision_encoder."):
            if name.startswith(prefix):
                return "vision_tower." + name[len(prefix):]
        return "vision_tower." + name
    for old, new in _LLAVA_PREFIXES if kind == "llava" else _CAUSAL_LM_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name
