"""Activation memory of one transformer layer for one micro-batch, per rank.

The method is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models" (arXiv 2205.05198, section 4): count every tensor autograd keeps for the backward pass,
with tensor parallelism dividing what lies inside the attention and MLP blocks and sequence
parallelism dividing the rest. Their 34*s*b*h + 5*a*s^2*b bytes are for GPT (4h GELU MLP, dropout,
LayerNorm); the counts here are re-derived for this model (RMSNorm, RoPE, GQA, SwiGLU, no dropout)
from megatron-core's modules, with h the width, f the ffn width, a/g the query/key-value heads,
d = h/a, t the tensor-parallel size and n the tokens of the stream:

    input norm          n*h (/t with SP)      + n fp32 rstd (local: torch's RMSNorm keeps the
                                               input and the normalised input, both in fp32)
    QKV input           n*h (/t with SP)
    RoPE cos, sin       4*n*d                  (local spec only; TE fuses RoPE)
    q, k, v             n*a*d/t + 2*n*a*d/t    (local: k, v repeated to a heads for GQA)
                        n*a*d/t + 2*n*g*d/t    (TE, or selective recompute)
    scores              a/t*s^2 per sequence, fp32 softmax + a copy in the parameter dtype
                        (local spec's decoder without recompute; flash attention keeps n*a/t fp32
                        instead; the local spec's encoder attends per image through torch's
                        scaled_dot_product_attention: fp32 q, k, v, output and log-sum-exp)
    attention output    n*a*d/t                (input of the output projection)
    MLP norm, FC1 input as for attention
    SwiGLU              2*n*f/t                (FC1's output only: `mmpretrain.model.swiglu`, both
                                                specs)
    FC2 input           n*f/t

Full recomputation keeps only each layer's input (n*h, /t with SP) and rebuilds one layer at a
time in the backward pass (Korthikanti's 2*s*b*h). Under FP8 the linear layers keep their inputs in
one byte. Besides what a layer keeps, its forward and backward need transient memory; for the
local spec's materialised scores that is large, and the counts used here (raw scores and their fp32
copy in the forward, three fp32 and one parameter-dtype score-sized tensors at the backward of the
in-place mask) were measured with torch's profiler on CPU, where `tests/test_planner.py` holds the
whole estimate to 5% for D, X and H. The gated cross-attention layers of X/H are counted by
`cross_attention_memory`.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpretrain.planner.workload import Numerics

FP32 = 4


@dataclass(frozen=True)
class Shape:
    """A transformer stack as the planner sees it."""

    hidden: int
    heads: int
    groups: int
    ffn: int

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.hidden // self.heads


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one layer keeps per micro-batch until its backward, and the transient memory its
    backward and its forward need beyond that."""

    saved: float
    working: float
    forward: float = 0.0


def norm_kept(elements: float, rows: float, num: Numerics, trains: bool = True) -> float:
    """Bytes an RMSNorm keeps: TE's fused norm its input and the fp32 rstd; torch's (local spec)
    computes in fp32 and keeps the fp32 input, and the normalised input when its weight trains."""
    if num.spec != "local":
        return elements * num.param_bytes + rows * FP32
    return elements * FP32 * (2 if trains else 1) + rows * FP32


def score_elements(heads_per_rank: float, lengths: list[int] | tuple[int, ...]) -> float:
    """Attention-score elements the local spec materialises: heads x len^2 per attended sequence."""
    return heads_per_rank * sum(n * n for n in lengths)


def layer_memory(shape: Shape, tokens: int, lengths: tuple[int, ...], tp: int, sp: bool,
                 num: Numerics, trains: bool = True, grads: bool = True,
                 packed: int | None = None) -> LayerMemory:
    """One layer over a stream of `tokens` made of dense-attention sequences of `lengths`
    (the local spec's score blocks: the decoder's rows). `packed`: the attention is
    `mmpretrain.model.packed_attention` instead (the encoder under the local spec: each image
    attends within itself through torch's scaled_dot_product_attention in fp32, on the images
    gathered into a padded batch of `packed` rows), which keeps no scores: its fp32 q, k, v,
    output and log-sum-exp (selective recomputation: the core attention's inputs only).
    A frozen layer (`trains` False) that gradients pass through keeps no linear-layer inputs and
    no normalised inputs: those serve only weight gradients. A layer no gradient passes through
    (`grads` False: frozen, with nothing before it training) keeps nothing."""
    b, bl = num.param_bytes, num.linear_input_bytes
    h, f, a, g, d = shape.hidden, shape.ffn, shape.heads, shape.groups, shape.head_dim
    shard = tp if sp else 1
    local = num.spec == "local"
    outside = tokens * h / shard  # elements of a full-width tensor outside the TP blocks
    norms = 2 * norm_kept(outside, tokens / shard, num, trains)
    # inputs of QKV, output projection, FC1, FC2 (kept for the weight gradients only)
    qkv_in, proj_in, fc1_in, fc2_in = (outside * bl, tokens * a * d / tp * bl, outside * bl,
                                       tokens * f / tp * bl) if trains else (0.0,) * 4
    sdpa = local and packed is not None
    keep_scores = local and not sdpa and num.recompute == "none"
    kv_heads = a if keep_scores else g
    qkv = tokens * (a + 2 * kv_heads) * d / tp * b
    rope = 4 * tokens * d * b if local else 0.0
    scores = 0.0 if sdpa else score_elements(a / tp, lengths)
    if sdpa and num.recompute == "none":  # fp32 q, k, v (heads repeated), output, log-sum-exp
        qkv, attention = 3 * packed * a / tp * d * FP32, packed * a / tp * (d + 1) * FP32
    elif keep_scores:
        attention = scores * (FP32 + _copy(b))
    else:
        attention = 0.0 if local else tokens * a / tp * FP32 + tokens * a * d / tp * b * (bl != b)
    swiglu = 2 * tokens * f / tp * b  # FC1's output, what `model.swiglu.SwiGLU` keeps
    full = norms + qkv_in + proj_in + fc1_in + fc2_in + qkv + rope + attention + swiglu
    released = norms / 2 + fc1_in + fc2_in + swiglu + proj_in + attention  # before scores' backward
    if sdpa:  # the gradients of q, k, v and the output in fp32 (recomputed inputs on top)
        recomputed = 0.0 if num.recompute == "none" else (4 * d + 1) * packed * a / tp * FP32
        working = max(3 * tokens * f / tp * b, recomputed + 4 * packed * a / tp * d * FP32)
    else:
        working = _working(tokens * f / tp * b, scores, released, num)
    forward = _forward(scores, keep_scores and grads, num) if local and not sdpa else 0.0
    if not grads:
        return LayerMemory(0.0, 0.0, forward)
    if num.recompute == "full":
        return LayerMemory(outside * b, working + full, forward)
    return LayerMemory(full, working, forward)


def _copy(b: int) -> int:
    """Bytes of the parameter-dtype copy the local spec makes around its fp32 softmax (none in fp32)."""
    return b if b != FP32 else 0


def _working(ffn_elements: float, scores: float, released: float, num: Numerics) -> float:
    """Memory a layer's backward needs on top of what the stage keeps: the MLP's input gradients
    (FC2 input, FC1 output); for the local spec the score gradients at the in-place mask's
    backward, three fp32 and one parameter-dtype [a/t, s, s] (measured on CPU: four fp32 in fp32,
    3.5 in bf16), less what the MLP, the output projection and the kept scores have released by
    then; recomputed scores come on top."""
    b = num.param_bytes
    mlp = 3 * ffn_elements
    if num.spec != "local":
        return mlp
    recomputed = scores * (FP32 + _copy(b)) if num.recompute != "none" else 0.0
    return max(mlp, recomputed + scores * (3 * FP32 + b) - released)


def _forward(scores: float, kept: bool, num: Numerics) -> float:
    """The local spec's forward transients not kept: the raw scores, their fp32 copy, and (when
    the layer keeps no scores) the softmax and its parameter-dtype copy."""
    b = num.param_bytes
    transient = scores * (b + (FP32 if b != FP32 else 0))
    return transient + (0.0 if kept else scores * (FP32 + _copy(b)))


def cross_attention_memory(shape: Shape, tokens: int, rows: int, width: int, tp: int, sp: bool,
                           num: Numerics, trains: bool = True, grads: bool = True) -> LayerMemory:
    """A gated cross-attention layer of X/H (`mmpretrain.model.cross_attention`) over `tokens`
    text positions in `rows` rows, each row attending to its own images' tokens padded to `width`
    keys. The layer is this project's own module: its norms and linears are the spec's (counted
    here as the local spec's, which keep at least as much as TE's), its attention torch's
    scaled_dot_product_attention in the parameter dtype with a boolean mask (flash attention on
    CPU, memory-efficient attention on GPUs: no scores kept). What autograd keeps:

        norms                   as the decoder's (local spec)
        q, proj, FC1, FC2 input the inputs of its linears (when it trains)
        q, k norms              per head in fp32: the fp32 input and rstd, and (when the layer
                                trains) the normalised output for the weight's gradient
        attention               q [b, a/t, s, d], k and v with their heads repeated
                                [b, a/t, kr, d], the output, the fp32 log-sum-exp; the mask as
                                a bias [b, 1, s, kr]
        SwiGLU                  2*n*f/t (FC1's output, as the decoder's)
        gate inputs             the attention and MLP outputs (for the gates' gradients)

    The keys [kr, b, h] and the boolean mask are shared by all cross-attention layers of a chunk
    and are counted once per chunk (`memory.ActivationModel.context`). Full recomputation reruns
    the layer with the decoder layer it precedes: it keeps nothing itself."""
    b = num.param_bytes
    h, f, a, d = shape.hidden, shape.ffn, shape.heads, shape.head_dim
    shard = tp if sp else 1
    local = Numerics(b, "local", num.recompute, False)
    outside = tokens * h / shard
    keys = rows * width
    if not grads:
        return LayerMemory(0.0, 0.0, 0.0)
    kept = 2 * norm_kept(outside, tokens / shard, local, trains)
    if trains:  # inputs of q, proj, FC1, FC2 and of the two gates
        kept += 2 * outside * b + tokens * a * d / tp * b + tokens * f / tp * b + 2 * outside * b
    heads = (tokens * a + keys * shape.groups) / tp  # rows of the q and k norms
    kept += heads * (d * (FP32 + b * trains) + FP32)  # q, k norms: fp32 input, output, rstd
    kept += (2 * tokens * a * d + 2 * keys * a * d) / tp * b  # q, out, k, v (heads repeated)
    kept += tokens * a / tp * FP32 + tokens * width * b  # log-sum-exp, the mask as a bias
    kept += 2 * tokens * f / tp * b  # SwiGLU: FC1's output
    working = max(3 * tokens * f / tp * b, (2 * tokens * a * d + 2 * keys * a * d) / tp * b)
    if num.recompute == "full":
        return LayerMemory(0.0, working + kept)
    return LayerMemory(kept, working)
