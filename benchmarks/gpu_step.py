"""GPU training-step benchmark (issue 9): tokens/s, model TFLOP/s, MFU and peak memory of one
training step of NVLM D, X and H on one GPU, per layer spec and precision; and DALI decoding.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_step.py --designs d,x,h --sizes 1b,3b \\
        --variants local-bf16,te-bf16,te-fp8 --steps 20 --warmup 5 --micro-batch 1 --seq-length 4096
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_step.py --designs d --sizes 3b \\
        --variants te-fp8-delayed,te-fp8-tensorwise,te-fp8-mxfp8 --dali-images 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_step.py --designs d --sizes 1b \\
        --variants te-bf16 --micro-batch 2 --accumulate 8 --dali-images 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gpu_step.py --smoke    # tiny, 2 steps, any device

Each case (design x size, shapes in gpu_cases.py) is built the way `mmpretrain train` builds it:
config overrides through mmpretrain.config.load (--set semantics) -> parallel layout and megatron
init for a world of one -> build_model_chunks -> megatron DDP, Adam and LR schedule ->
mmpretrain.train.step.train_step, on synthetic packed batches (gpu_cases.make_batches). Variants
`SPEC-PREC[-RECIPE]` set model.spec (auto|local|te), train.precision, train.fp8 (fp8: hybrid,
e4m3) and train.fp8_recipe (delayed|tensorwise|mxfp8); one the config or the machine cannot run is
printed as `skipped: <reason>`; `--set KEY=VALUE` adds an override to every case (e.g.
vision.fp8=true, train.recompute=selective). After --warmup steps (at least one pass over the
batches), --steps steps are timed between
torch.cuda.synchronize() calls; a step is --accumulate micro-batches of --micro-batch rows each
(gradient accumulation, as a job with train.global_batch_size = micro-batch x accumulate x dp
runs it: the optimizer's cost is spread over them). TFLOP/s are the planner's model FLOPs of the timed batches
(encoder, projector, decoder, cross-attention, head; no recomputation; the decoder's attention
over the full s x s square of each row, Megatron-LM's convention, whatever the packing) per
second; MFU divides them by the planner's dense bf16 peak of the GPU for every variant, fp8
included (the same yardstick for all; an fp8 run may pass what bf16 could reach). Peak memory is
torch.cuda.max_memory_allocated over the timed steps. --profile N profiles N more steps of
each variant (gpu_profile.py: host vs device time per step, and the ops behind them). --smoke
runs the tiny shape for 2 steps in fp32 with the local spec on whatever device is present (on a
CPU: no MFU, no peak memory).
DALI: images/s of decoding --dali-images generated JPEGs (photo-like, 200-2000 px a side; making
200 takes about a minute) with Pillow, DALI's CPU pipeline and DALI's `mixed` (nvJPEG) decoder on
GPU 0, each through mmpretrain.data.decode.decode_image, one image per call as the loader does.
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import math
import shlex
import sys
import textwrap
import time
import traceback

import torch
from gpu_cases import (
    SIZES,
    Tok,
    case_overrides,
    fp8_recipe,
    make_batches,
    model_flops,
    trainable_params,
    variant_overrides,
)
from gpu_profile import profile_steps, sync
from gpu_report import Row, dali_rows, gpu_peak, header, summary, table
from mmpretrain.parallel import cuda_to_cpu, init_distributed
from mmpretrain.parallel.layout import ParallelLayout

from mmpretrain.config import ConfigError, check_trainable, load
from mmpretrain.model.build import build_model_chunks
from mmpretrain.planner.hardware import GPU, GPUS
from mmpretrain.train.optim import build_optimizer, build_scheduler, wrap_ddp
from mmpretrain.train.step import train_step

SKIP = (ConfigError, ImportError, NotImplementedError)  # the variant cannot run here
DEFAULTS = {"designs": "d,x,h", "sizes": "1b,3b", "variants": "local-bf16,te-bf16,te-fp8",
            "steps": 20, "warmup": 5, "micro_batch": 1, "accumulate": 1, "seq_length": 4096,
            "vocab": 32000, "batches": 4, "dali_images": 200}
SMOKE = {"sizes": "smoke", "variants": "local-fp32,te-bf16,te-fp8", "steps": 2, "warmup": 1,
         "micro_batch": 2, "seq_length": 256, "vocab": 512, "batches": 2, "dali_images": 12}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--designs", help=f"comma list of d,x,h (default {DEFAULTS['designs']})")
    p.add_argument("--sizes", help=f"comma list of 1b,3b,smoke (default {DEFAULTS['sizes']})")
    p.add_argument("--variants", help="comma list of SPEC-PREC[-RECIPE]: SPEC auto|local|te, PREC "
                   f"fp32|bf16|fp8|e4m3, RECIPE delayed|tensorwise|mxfp8 (default {DEFAULTS['variants']})")
    p.add_argument("--steps", type=int, help="timed steps (default 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 5; at least enough to "
                   "run every batch once)")
    p.add_argument("--micro-batch", type=int, help="packed rows per micro-batch (default 1)")
    p.add_argument("--accumulate", type=int,
                   help="micro-batches per optimizer step, gradients accumulated (default 1)")
    p.add_argument("--seq-length", type=int, help="decoder tokens per row (default 4096)")
    p.add_argument("--vocab", type=int, help="decoder vocabulary (default 32000)")
    p.add_argument("--max-patches", type=int, default=0,
                   help="data.max_patches per micro-batch (0: 4 x seq-length x micro-batch)")
    p.add_argument("--batches", type=int, help="distinct synthetic micro-batches, cycled (default 4)")
    p.add_argument("--dali-images", type=int, help="JPEGs for the DALI benchmark, 0: none (default 200)")
    p.add_argument("--gpu", choices=sorted(GPUS), help="peak table entry for MFU (default: by name)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every case (e.g. vision.fp8=true), as `train --set`")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after timing, profile N more steps of each variant: host vs device time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps, fp32 local, any device")
    args = p.parse_args(argv)
    for key, value in {**DEFAULTS, **(SMOKE if args.smoke else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.designs, args.sizes = args.designs.split(","), args.sizes.split(",")
    args.variants = args.variants.split(",")
    if not set(args.designs) <= set("dxh") or not set(args.sizes) <= set(SIZES):
        p.error(f"--designs takes d,x,h and --sizes {','.join(SIZES)}")
    if args.steps < 1 or args.warmup < 0 or args.batches < 1 or args.accumulate < 1:
        p.error("--steps, --batches and --accumulate must be >= 1, --warmup >= 0")
    try:
        for v in args.variants:
            variant_overrides(v)
    except ValueError as e:
        p.error(str(e))
    return args


def release() -> None:
    """Free what a variant left: megatron's score buffer, TE's FP8 state, the CUDA cache."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.get_global_memory_buffer().buffer.clear()
    for mod in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization"):
        manager = getattr(sys.modules.get(mod), "FP8GlobalStateManager", None)  # where TE has it
        if manager is not None:
            manager.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unsupported(cfg) -> str | None:
    """Why this machine cannot run a config that the config's own checks let through (a fallback:
    check_trainable refuses the TE spec and FP8 where they cannot run)."""
    spec = getattr(cfg.model, "spec", "local")
    if (spec == "te" or cfg.train.fp8) and importlib.util.find_spec("transformer_engine") is None:
        return "Transformer Engine is not installed (pip install .[gpu])"
    if cfg.train.fp8 and not torch.cuda.is_available():
        return "train.fp8 needs a CUDA GPU"
    return None


def build(cfg):
    """Layout, megatron init, model, DDP, optimizer and schedule, as `mmpretrain train` sets up."""
    layout = ParallelLayout.from_config(cfg, 1)
    init_distributed(layout.tp, layout.pp, layout.vpp, seed=cfg.train.seed)
    with cuda_to_cpu():
        chunks = build_model_chunks(cfg, cfg.decoder.vocab_size, Tok.img_id)
        ddps = wrap_ddp(chunks, cfg)
        optimizer = build_optimizer(ddps, cfg)
    return ddps, optimizer, build_scheduler(optimizer, cfg)


def measure(cfg, batches: list, flops: list[float], args, row: Row, gpu: GPU | None) -> None:
    """Warm up, time `args.steps` steps over the batches in turn (`args.accumulate` micro-batches
    each), fill in `row`."""
    ddps, optimizer, scheduler = build(cfg)
    seq, n, k = cfg.data.seq_length, len(batches), args.accumulate
    warm = max(args.warmup, math.ceil(n / k))  # every batch's shapes are met before the clock
    skipped = []

    def step(i: int) -> float:
        loss, _, _, applied = train_step(ddps, optimizer,
                                         [batches[(i * k + j) % n] for j in range(k)], seq)
        scheduler.step(1)
        skipped.append(not applied)
        return loss

    for i in range(warm):
        step(i)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(warm, warm + args.steps):
        row.loss = step(i)
    sync()
    elapsed = time.perf_counter() - t0
    if any(skipped[warm:]):  # no optimizer step ran: the figures would flatter the variant
        raise RuntimeError(f"{sum(skipped[warm:])} of {args.steps} timed steps skipped their "
                           f"update (non-finite loss or gradient)")
    total = sum(flops[(i * k + j) % n] for i in range(warm, warm + args.steps) for j in range(k))
    row.step_s = elapsed / args.steps
    row.tokens_s = args.steps * k * cfg.data.micro_batch_size * seq / elapsed
    row.tflops = total / elapsed / 1e12
    row.mfu = row.tflops * 1e12 / gpu.peak_flops(False) if gpu else None
    row.peak_gib = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    if args.profile:  # the timing above stands whatever happens here
        try:
            row.profile = profile_steps(step, warm + args.steps, args.profile)
        except Exception as e:  # noqa: BLE001 - a profiler failure is reported with the row
            traceback.print_exc()
            row.profile = f"profile failed: {_reason(e)}"


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def run_variant(base: list[str], row: Row, batches: list, flops: list[float], args,
                gpu: GPU | None) -> Row:
    """One variant of a case: skipped when the config or the machine refuses it, else measured."""
    try:
        cfg = load(None, base + variant_overrides(row.variant))
        check_trainable(cfg)
        row.fp8 = fp8_recipe(cfg)
        reason = unsupported(cfg)
    except SKIP as e:
        reason = _reason(e)
    if reason:
        row.status = f"skipped: {reason}"
        return row
    try:
        measure(cfg, batches, flops, args, row, gpu)
    except SKIP as e:
        row.status = f"skipped: {_reason(e)}"
    except torch.cuda.OutOfMemoryError:
        row.status = "failed: CUDA out of memory"
    except Exception as e:  # noqa: BLE001 - report it and go on to the next variant
        traceback.print_exc()
        row.status = f"failed: {_reason(e)}"
    return row


def run_case(design: str, size: str, args, gpu: GPU | None) -> list[Row]:
    """All variants of design x size on the same synthetic batches."""
    base = case_overrides(design, size, args.seq_length, args.micro_batch, args.vocab,
                          args.max_patches, args.accumulate) + args.set
    batch = f"{args.micro_batch} x {args.accumulate}"
    try:
        cfg = load(None, base)
    except ConfigError as e:
        return [Row(design.upper(), size, 0, v, f"skipped: {_reason(e)}", batch=batch)
                for v in args.variants]
    batches = make_batches(cfg, args.batches, args.seed)
    flops = [model_flops(cfg, b) for b in batches]
    images = sum(len(b.image_sizes) for b in batches) / len(batches)
    patches = sum(b.patches.shape[0] for b in batches) / len(batches)
    filled = sum(b.efficiency for b in batches) / len(batches)
    print(f"== {design.upper()} {size}: {trainable_params(cfg) / 1e9:.3f}B parameters; per step "
          f"{args.accumulate} micro-batch(es) of {args.micro_batch} x {args.seq_length} tokens "
          f"({100 * filled:.1f}% samples, the rest padding), each {images:.1f} images, "
          f"{patches:.0f} patches, {sum(flops) / len(flops) / 1e12:.3g} model TFLOP", flush=True)
    rows = []
    for variant in args.variants:
        row = Row(design.upper(), size, trainable_params(cfg), variant, batch=batch)
        row = run_variant(base, row, batches, flops, args, gpu)
        release()
        rows.append(row)
        print(f"   {variant}: {summary(row)}", flush=True)
        if row.profile:
            print(textwrap.indent(row.profile, "     "), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    gpu = gpu_peak(args.gpu)
    rows = [r for d in args.designs for s in args.sizes for r in run_case(d, s, args, gpu)]
    dali = dali_rows(args.dali_images, args.seed, small=args.smoke)
    command = "OMP_NUM_THREADS=1 python " + shlex.join(sys.argv if argv is None else ["gpu_step.py", *argv])
    print()
    print(header(gpu, command))
    print()
    print(table(rows))
    if dali:
        print()
        print(dali)


if __name__ == "__main__":
    main()
