"""One plan: parameters, memory per stage, FLOPs, pipeline bubble and step time of a config on a
number of GPUs.

Step time: each stage's hardware FLOPs per micro-batch (model FLOPs plus recomputation), divided
over its tp ranks, run at `mfu` of the GPU's dense bf16 peak (FP8 linear layers `FP8_GAIN` times
faster), plus its exposed tensor-parallel and pipeline communication (`comm`); `schedule.step_time`
combines the stages; the exposed data-parallel gradient reduction is added once per step.

A plan fits when its largest stage, plus 5% for allocator fragmentation and a fixed reserve of
2.5 GiB (CUDA context, NCCL communicators and buffers, cuBLAS workspaces), is within the GPU's memory.
"""
from __future__ import annotations

from dataclasses import dataclass

from mmpretrain.config import Config
from mmpretrain.planner import params as P
from mmpretrain.planner.comm import dp_seconds, p2p_bytes, p2p_seconds, tp_seconds
from mmpretrain.planner.flops import Flops, ModelFlops
from mmpretrain.planner.hardware import GPU, GiB
from mmpretrain.planner.memory import ActivationModel, StageMemory, stage_memory
from mmpretrain.planner.schedule import bubble_fraction, step_time
from mmpretrain.planner.stages import (
    Stage,
    StageParams,
    first_grad_layer,
    grad_layers,
    stage_params,
    stages_of,
)
from mmpretrain.planner.workload import Numerics, Workload, context_capacity

RESERVE_BYTES = 2.5 * GiB
FRAGMENTATION = 0.05


@dataclass(frozen=True)
class StagePlan:
    """One pipeline stage of a plan."""

    index: int
    layers: int
    params: StageParams
    memory: StageMemory
    flops: Flops
    seconds: float
    """Forward+backward time of one micro-batch."""


@dataclass(frozen=True)
class Plan:
    """Everything `mmpretrain plan` reports."""

    world: int
    tp: int
    pp: int
    vpp: int | None
    dp: int
    n_micro: int
    model: P.ModelParams
    trainable: int
    stages: list[StagePlan]
    model_flops_per_step: float
    step_seconds: float
    dp_seconds: float
    bubble: float
    tokens_per_step: int
    mfu: float
    gpu: GPU
    work: Workload
    num: Numerics
    vocab: int
    """The tokenizer's vocabulary (before padding)."""
    p2p_bytes: float = 0.0
    """Bytes of one tensor sent between pipeline stages (0 without pipelining)."""
    context_tokens: int = 0
    """X/H under pipelining: image-context tokens sent with the hidden states."""

    @property
    def peak_bytes(self) -> float:
        """Memory of the fullest stage."""
        return max(s.memory.total for s in self.stages)

    @property
    def required_bytes(self) -> float:
        """The fullest stage with fragmentation and the fixed reserve."""
        return self.peak_bytes * (1 + FRAGMENTATION) + RESERVE_BYTES

    @property
    def fits(self) -> bool:
        """Whether every stage fits in the GPU's memory."""
        return self.required_bytes <= self.gpu.memory_bytes

    @property
    def tokens_per_second(self) -> float:
        """Decoder tokens per second over the whole job."""
        return self.tokens_per_step / self.step_seconds

    @property
    def achieved_mfu(self) -> float:
        """Model FLOPs per second over the job's bf16 peak."""
        return self.model_flops_per_step / (self.step_seconds * self.world * self.gpu.peak_flops(False))


def trainable_total(cfg: Config, model: P.ModelParams) -> int:
    """Parameters that train, over the whole model."""
    t = P.Trains.of(cfg)
    parts = [(model.vision, t.vision), (model.projector, t.projector),
             (model.embedding + model.layer * model.num_layers + model.final_norm + model.output,
              t.decoder), (model.xattn * len(model.positions), t.xattn)]
    return sum(c.total for c, trains in parts if trains)


def _compute_seconds(flops: Flops, tp: int, gpu: GPU, num: Numerics, mfu: float) -> float:
    return (flops.linear / gpu.peak_flops(num.fp8) + flops.attention / gpu.peak_flops(False)) / (tp * mfu)


def _tp_seconds(cfg: Config, model: P.ModelParams, stage: Stage, work: Workload, num: Numerics,
                gpu: GPU) -> float:
    """Exposed tensor-parallel communication of one micro-batch on `stage`."""
    tp, b = cfg.parallel.tp, num.param_bytes
    start = first_grad_layer(cfg, model)
    layers = [i for f, n in zip(stage.chunk_first_layer, stage.chunk_layers) for i in range(f, f + n)]
    n_x = [model.xattn_before(i) for i in layers]
    with_grads = sum(grad_layers(f, n, start) for f, n in zip(stage.chunk_first_layer,
                                                              stage.chunk_layers))
    x_grads = sum(1 for i, x in zip(layers, n_x) if x and i >= start)
    n_grads, n_fwd = with_grads + x_grads, len(layers) + sum(n_x) - with_grads - x_grads
    t = tp_seconds(n_grads, work.tokens, cfg.decoder.hidden_size, tp, b, True, gpu)
    t += tp_seconds(n_fwd, work.tokens, cfg.decoder.hidden_size, tp, b, False, gpu)
    if stage.first:
        t += tp_seconds(cfg.vision.num_layers, work.patches, cfg.vision.hidden_size, tp, b,
                        P.Trains.of(cfg).vision, gpu)
    return t


def make_plan(cfg: Config, world: int, gpu: GPU, vocab_size: int, work: Workload, num: Numerics,
              mfu: float = 0.4, gpus_per_node: int = 8) -> Plan:
    """Plan `cfg` on `world` GPUs (the layout must already be valid for that world)."""
    p = cfg.parallel
    dp = world // (p.tp * p.pp)
    n_micro = cfg.train.global_batch_size // (cfg.data.micro_batch_size * dp)
    model = P.count(cfg, vocab_size)
    acts = ActivationModel(cfg, work, num, vocab_size)
    flops = ModelFlops(cfg, model, work, vocab_size)
    out = []
    context = context_capacity(cfg)
    size = p2p_bytes(work.tokens, cfg.decoder.hidden_size, p.tp, p.sequence_parallel, context,
                     num.param_bytes) if p.pp > 1 else 0.0
    v = p.vpp or 1
    p2p = p2p_seconds(size, v, p.tp, dp, gpus_per_node, gpu) if p.pp > 1 else 0.0
    for st in stages_of(cfg):
        f = flops.stage(st)
        hw = f + flops.recompute(st, num.recompute)
        seconds = _compute_seconds(hw, p.tp, gpu, num, mfu) + _tp_seconds(cfg, model, st, work, num,
                                                                           gpu) + p2p
        out.append(StagePlan(st.index, st.layers, stage_params(cfg, model, st),
                             stage_memory(cfg, model, st, acts, dp, n_micro), f, seconds))
    dp_s = dp_seconds(max(s.params.trainable for s in out), p.tp, dp, gpus_per_node, gpu)
    seconds = step_time([s.seconds for s in out], n_micro, v) + dp_s
    model_flops = sum(s.flops.total for s in out) * n_micro * dp
    return Plan(world, p.tp, p.pp, p.vpp, dp, n_micro, model, trainable_total(cfg, model), out,
                model_flops, seconds, dp_s, bubble_fraction(p.pp, v, n_micro),
                cfg.train.global_batch_size * cfg.data.seq_length, mfu, gpu, work, num, vocab_size,
                size, context)
