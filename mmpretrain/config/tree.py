"""The config tree: one dataclass per section, a one-line docstring under every field."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A bad config key or value; the message names it."""


@dataclass
class ModelConfig:
    design: Literal["d", "x", "h"] = "d"
    """NVLM design: 'd' decoder-only, 'x' gated cross-attention, 'h' hybrid (thumbnail in stream)."""
    cross_attention_every: int = 0
    """x/h: a gated cross-attention layer before decoder layers k, 2k, 3k, ... (1-based); 0: none."""
    cross_attention_layers: list[int] = field(default_factory=list)
    """x/h: explicit 1-based decoder layers preceded by a cross-attention layer (added to _every)."""
    train_only_cross_attention: bool = False
    """x/h: Flamingo-style, freeze encoder and decoder; train the cross-attention layers (and the
    projector unless projector.freeze)."""
    cross_attention_gate_lr_mult: float = 1.0
    """x/h: learning-rate multiplier of the tanh gates (at the base lr they open slowly from 0)."""
    init_std: float = 0.02
    """Standard deviation of the normal init of the weight matrices; the output projections
    (attention out, MLP down, projector's second layer) take init_std / sqrt(2 x num_layers), as
    in megatron and GPT-2."""
    spec: Literal["auto", "local", "te"] = "auto"
    """Layers: 'te' (Transformer Engine: fused norm+linear, flash/cuDNN attention, FP8; CUDA),
    'local' (megatron-core modules, any device), 'auto' (te where it imports and CUDA is present)."""
    packed_attention: Literal["auto", "thd", "mask"] = "auto"
    """How the decoder keeps packed samples apart: 'thd' (PackedSeqParams cu_seqlens), 'mask' (a
    dense block-diagonal causal mask; local spec only), 'auto' (thd with te, mask with local)."""
    te_fused_mlp: bool = False
    """TE spec only: each encoder and decoder MLP (RMSNorm, FC1, SwiGLU, FC2) as one Transformer
    Engine operation sequence (megatron's TEFusedMLP: TE's SwiGLU kernel, one autograd node)
    instead of three modules; the same weights and checkpoints."""


@dataclass
class VisionConfig:
    num_layers: int = 2
    """Transformer layers of the vision encoder."""
    hidden_size: int = 64
    """Width of the vision encoder."""
    num_attention_heads: int = 4
    """Attention heads of the vision encoder."""
    ffn_hidden_size: int = 128
    """Inner width of the encoder's SwiGLU MLP."""
    patch_size: int = 16
    """Side of a square image patch, in pixels."""
    rope_theta: float = 10000.0
    """Base of the 2-D rotary embedding's frequencies."""
    norm_eps: float = 1e-5
    """Epsilon of the encoder's RMSNorms."""
    freeze: bool = False
    """Keep the vision encoder's weights fixed."""
    fp8: bool = False
    """With train.fp8: the encoder's linear layers in FP8 too (its patch stream padded to 16)."""


@dataclass
class ProjectorConfig:
    merge: int = 1
    """Patch merge (pixel shuffle) factor per side: 1 (none) or 2 (2x2 patches become one token)."""
    hidden_size: int | None = None
    """Inner width of the 2-layer GELU MLP; None means the decoder's hidden size."""
    freeze: bool = False
    """Keep the projector's weights fixed."""


@dataclass
class DecoderConfig:
    num_layers: int = 2
    """Transformer layers of the language decoder."""
    hidden_size: int = 128
    """Width of the decoder."""
    num_attention_heads: int = 4
    """Query heads of the decoder."""
    num_query_groups: int = 2
    """Key/value heads (grouped-query attention); equal to the heads for plain multi-head."""
    ffn_hidden_size: int = 256
    """Inner width of the decoder's SwiGLU MLP."""
    rope_theta: float = 10000.0
    """Base of the decoder's rotary embedding."""
    norm_eps: float = 1e-5
    """Epsilon of the decoder's RMSNorms."""
    vocab_size: int | None = None
    """Rows of the embedding and output layer (at least the tokenizer's ids, padded for tp);
    None takes the dataset tokenizer's size."""
    freeze: bool = False
    """Keep the decoder's weights (embeddings and output layer included) fixed."""


@dataclass
class DatasetConfig:
    path: str = ""
    """An MDS shard directory (or a dataset directory holding <split>/), local or a remote URL."""
    weight: float = 1.0
    """Share of the training mixture, relative to the other datasets' weights."""


@dataclass
class DataConfig:
    path: str = "data-synth"
    """Dataset directory holding train/, heldout/ and tokenizer.json (as `data synth` writes)."""
    seq_length: int = 256
    """Length of a packed decoder sequence, in tokens."""
    micro_batch_size: int = 4
    """Packed sequences per micro-batch."""
    image_token_budget: int = 64
    """Largest number of patches one image may take (native-resolution resize)."""
    max_upscale: float = 2.0
    """Largest factor by which a small image may be enlarged."""
    shuffle_seed: int = 0
    """Seed of the sample order."""
    datasets: list[DatasetConfig] = field(default_factory=list)
    """Training mixture of {path, weight}; empty: <path>/train alone."""
    cache_dir: str = ""
    """Local cache for shards of remote datasets; empty: ~/.cache/mmpretrain/shards."""
    cache_limit: str | int = ""
    """Most bytes cache_dir may hold on a node, e.g. "200GB" (2^30 bytes a GB) or a byte count,
    LRU-evicted; "" or 0: none."""
    resize: Literal["native", "tiles"] = "native"
    """Image policy: 'native' (aspect kept, token budget) or 'tiles' (NVLM tiles + thumbnail)."""
    max_image_side: int = 0
    """native: longest image side in pixels after resizing (0: only the token budget caps it)."""
    max_tiles: int = 6
    """tiles: most tiles per image, the thumbnail not counted."""
    tile_size: int = 448
    """tiles: side of a square tile in pixels (a multiple of patch_size x projector.merge)."""
    tile_thumbnail: bool = True
    """tiles: add a global thumbnail after the tiles when there is more than one tile."""
    max_image_pixels: int = 67108864
    """Images with more pixels are skipped before decoding (decompression bombs)."""
    decoder: Literal["auto", "dali", "pillow"] = "auto"
    """Image decoder: 'dali' (GPU 'mixed' or CPU pipeline), 'pillow', 'auto' (DALI on GPU, else Pillow)."""
    workers: int = 0
    """Processes reading, decoding and tokenizing ahead of the packer (0: the training process)."""
    long_samples: Literal["truncate", "drop"] = "truncate"
    """A sample longer than seq_length (or over max_patches): cut its end, or skip it; both counted."""
    max_patches: int = 0
    """Largest encoder stream (patches of all images) of one micro-batch; 0: no limit."""
    pack_buffer: float = 2.0
    """Micro-batches' worth of tokens the best-fit packer holds before forming a micro-batch."""


@dataclass
class TrainConfig:
    steps: int = 100
    """Optimizer steps to run."""
    global_batch_size: int = 4
    """Packed sequences per optimizer step, over all data-parallel ranks."""
    lr: float = 1e-3
    """Peak learning rate."""
    min_lr: float = 1e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 10
    """Steps of linear warmup."""
    lr_decay: Literal["cosine", "linear", "wsd", "constant"] = "cosine"
    """The learning rate after the warmup: 'cosine' or 'linear' decay to min_lr at the last step;
    'wsd' (warmup-stable-decay) lr until the last `wsd_decay_steps` steps, which decay to min_lr;
    'constant' lr to the end."""
    wsd_decay_steps: int = 0
    """wsd: steps of the final decay, counted back from train.steps (at most the steps after
    the warmup but one)."""
    wsd_decay_style: Literal["linear", "cosine", "exponential", "minus_sqrt"] = "linear"
    """wsd: shape of the final decay ('minus_sqrt': lr falls as 1 - sqrt of its progress)."""
    weight_decay: float = 0.01
    """Decoupled weight decay (AdamW)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    clip_grad: float = 1.0
    """Gradient-norm clipping threshold (0 disables)."""
    max_skipped_steps: int = 8
    """A step whose loss or gradient norm is not finite is skipped (weights, optimizer and LR
    schedule unchanged; counted in the metrics as skipped_updates); this many in a row stop the
    run with exit status 1, after saving a checkpoint (the last finite update's weights). A
    global batch with no text token to score is skipped too, but not counted towards this."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Parameter/compute dtype; 'auto' is bf16 on GPU and fp32 on CPU."""
    seed: int = 1234
    """Seed of initialisation and dropout."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation: none, selective (attention core only) or full (each layer's input kept)."""
    fp8: Literal["hybrid", "e4m3"] | None = None
    """FP8 format of the decoder's linear layers (Transformer Engine, H100 and newer); null: bf16."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8"] = "delayed"
    """FP8 scaling: 'delayed' (amax history), 'tensorwise' (current scaling), 'mxfp8' (B200)."""
    eval_every: int = 0
    """Held-out loss every this many steps and at the last step (0: never): the first
    `eval_samples` samples of <data.path>/heldout, the same at every evaluation, logged as
    `eval/loss` (loss per text token)."""
    eval_samples: int = 64
    """Held-out samples of each evaluation (all of the split when it has fewer); packed once at
    start and kept in host memory for the run, each data-parallel rank its share."""
    gradient_accumulation_fusion: bool = False
    """Transformer Engine's linear layers add their weight gradients into the fp32 gradient
    buffer inside the GEMM, instead of writing a bf16 gradient that is then added (TE spec only;
    megatron's own linears, the output layer and the projector, keep the separate add)."""


@dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None for none."""
    sequence_parallel: bool = False
    """Split the decoder's activations along the sequence over the tensor-parallel group."""
    distributed_optimizer: bool = False
    """Shard optimizer states over the data-parallel group."""
    first_stage_decoder_layers: int | None = None
    """Decoder layers on the first pipeline stage (which also runs the vision encoder); None: even."""


@dataclass
class CheckpointConfig:
    every: int = 0
    """Save every this many steps (0: only at the end)."""
    keep: int = 2
    """Checkpoints to keep (the newest ones; 0: all); the one `latest` names is never deleted."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none)."""
    init_from: str = ""
    """Weights-only start (a checkpoint or a run dir's latest) when the run has no checkpoint yet."""
    async_save: bool = False
    """Write checkpoint tensors in a background process while training goes on (megatron-core)."""
    optimizer_format: Literal["dp_reshardable", "fully_reshardable"] = "dp_reshardable"
    """How the distributed optimizer's state is saved. "dp_reshardable": each rank writes its
    own shards, no communication; resumes at the same tp, pp and vpp with any dp.
    "fully_reshardable": gathered over dp into the parameters' own shapes at every save;
    resumes at any layout. Each rank then holds its tp x pp part of the whole fp32 state on the
    host: 12 bytes per parameter (about 20 at the peak of a save, and 4 more on the GPU while
    gathering) at a save, 12 at a load. A run saves in its own format, whatever the format it
    resumed from."""


@dataclass
class LoggingConfig:
    every: int = 5
    """Log metrics every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files under <run>/tb."""
    profile_steps: list[int] = field(default_factory=list)
    """[first, last]: profile these steps (at most 20) with torch.profiler (a trace per rank
    under <run>/profile/, the top ops logged); empty: none."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model design and initialisation."""
    vision: VisionConfig = field(default_factory=VisionConfig)
    """Vision encoder."""
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    """Vision-to-language projector."""
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Language decoder."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data source and packing."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics and console output."""


# ---------------------------------------------------------------- strict conversion
