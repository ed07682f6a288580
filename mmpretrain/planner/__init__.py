"""The planner: parameters, memory per GPU, FLOPs and step time of a job config on a cluster.

`plan_job(cfg, nodes)` validates the layout for nodes x gpus-per-node ranks and returns a `Plan`;
`report.text(plan, ...)` prints it; `suggest.suggest(...)` finds layouts that fit. Modules:
params (exact counts), stages (pipeline split), workload (micro-batch sizes, numerics),
activations (per-layer activation memory), memory (per-stage totals), flops, schedule
(in-flight micro-batches, bubble, step time), hardware (GPU figures), plan, report, suggest.
"""
from __future__ import annotations

from pathlib import Path

from mmpretrain.config import Config, ConfigError
from mmpretrain.planner.hardware import gpu as gpu_named
from mmpretrain.planner.layout import check
from mmpretrain.planner.plan import Plan, make_plan
from mmpretrain.planner.workload import Numerics, Spec, Workload


def vocab_size_of(cfg: Config) -> int:
    """decoder.vocab_size, else the size of the dataset's tokenizer."""
    if cfg.decoder.vocab_size is not None:
        return cfg.decoder.vocab_size
    path = Path(cfg.data.path) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"decoder.vocab_size is null and {path} does not exist: set "
                          "decoder.vocab_size to plan without the dataset")
    from mmpretrain.data.tokenizer import TextTokenizer

    return TextTokenizer.load(path).vocab_size


def plan_job(cfg: Config, nodes: int, gpus_per_node: int = 8, gpu: str = "h100", mfu: float = 0.4,
             image_fraction: float = 1.0, spec: Spec = "te", vocab_size: int | None = None,
             validate: bool = True) -> Plan:
    """Plan `cfg` on `nodes` x `gpus_per_node` GPUs of kind `gpu`."""
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes and --gpus-per-node must be positive, got {nodes}, {gpus_per_node}")
    if not 0.0 < mfu <= 1.0:
        raise ConfigError(f"--mfu must be in (0, 1], got {mfu}")
    world = nodes * gpus_per_node
    if validate:
        check(cfg, world)
    vocab = vocab_size if vocab_size is not None else vocab_size_of(cfg)
    return make_plan(cfg, world, gpu_named(gpu), vocab, Workload.from_config(cfg, image_fraction),
                     Numerics.from_config(cfg, spec), mfu, gpus_per_node)


__all__ = ["Plan", "plan_job", "vocab_size_of"]
