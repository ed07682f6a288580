"""`mmpretrain plan` output: a plan as text for people and as a mapping for scripts."""
from __future__ import annotations

from mmpretrain.planner.hardware import GiB
from mmpretrain.planner.plan import FRAGMENTATION, RESERVE_BYTES, Plan


def _b(n: float) -> str:
    """A parameter count in billions (or millions when small)."""
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def _gib(n: float) -> str:
    return f"{n / GiB:6.1f}"


def layout_line(plan: Plan, cfg) -> str:
    """tp/pp/vpp/dp and the options that shape memory."""
    p, t = cfg.parallel, cfg.train
    vpp = f" x vpp {plan.vpp}" if plan.vpp else ""
    opts = [o for o, on in (("sequence parallel", p.sequence_parallel),
                            ("distributed optimizer", p.distributed_optimizer)) if on]
    prec = f"fp8 {t.fp8} ({t.fp8_recipe} scaling; Transformer Engine layers)" \
        if t.fp8 else ("fp32" if plan.num.param_bytes == 4 else "bf16")
    return (f"tp {plan.tp} x pp {plan.pp}{vpp} x dp {plan.dp}; {', '.join(opts) or 'no SP/ZeRO'}; "
            f"recompute {t.recompute}; {prec}; {plan.num.spec} spec")


def memory_table(plan: Plan) -> list[str]:
    """One row per pipeline stage."""
    rows = ["  stage layers  params/rank (trainable)  weights  grads   optim  buffers   acts  working"
            "   total GiB"]
    for s in plan.stages:
        m = s.memory
        rows.append(f"  {s.index:5d} {s.layers:6d}  {_b(s.params.total):>10} ({_b(s.params.trainable):>9})"
                    f"  {_gib(m.weights)} {_gib(m.grads)} {_gib(m.optimizer)}  {_gib(m.buffers)}"
                    f" {_gib(m.activations)}  {_gib(m.working)}  {_gib(m.total)}")
    return rows


def text(plan: Plan, cfg, name: str, nodes: int, gpus_per_node: int) -> str:
    """The plan as a report."""
    w, g, mp = plan.work, plan.gpu, plan.model
    vis = mp.vision.total
    cross = (f", {w.cross_tokens} of them cross-attended by {len(mp.positions)} cross-attention "
             f"layers") if mp.positions else ""
    lines = [
        f"{name}: {nodes} node(s) x {gpus_per_node} {g.name} = {plan.world} GPUs "
        f"({g.memory_gib:.1f} GiB, {g.bf16_tflops:.0f} TFLOP/s bf16 each)",
        f"layout      {layout_line(plan, cfg)}",
        f"micro-batch {w.micro_batch} x {w.seq_length} tokens; {w.image_tokens} projected image "
        f"tokens from {w.patches} patches in {w.images} images{cross}; {plan.n_micro} "
        f"micro-batches per step per data-parallel rank",
        f"parameters  {_b(mp.total)} total (vision {_b(vis)}, projector {_b(mp.projector.total)}, "
        f"decoder {_b(mp.decoder.total)}), {_b(plan.trainable)} trainable",
        "memory per GPU, GiB:",
        *memory_table(plan),
        f"  peak {plan.peak_bytes / GiB:.1f} GiB + {FRAGMENTATION:.0%} fragmentation + "
        f"{RESERVE_BYTES / GiB:.1f} GiB reserve = {plan.required_bytes / GiB:.1f} of "
        f"{g.memory_gib:.1f} GiB",
        f"FLOPs/step  {plan.model_flops_per_step:.3e} model FLOPs (forward + backward, vision "
        "encoder included)",
        f"pipeline    bubble {plan.bubble:.1%} = (pp-1)/(vpp*m); per-micro-batch stage times "
        + ", ".join(f"{s.seconds * 1e3:.0f} ms" for s in plan.stages),
        *([f"p2p         {plan.p2p_bytes / 2**20:.1f} MiB per send between stages"
           + (f" (hidden states + image context of {plan.context_tokens} tokens)"
              if plan.context_tokens else " (hidden states)")] if plan.pp > 1 else []),
        f"step        {plan.step_seconds:.2f} s at MFU {plan.mfu:.2f} of peak per busy GPU "
        f"(data-parallel gradient reduction {plan.dp_seconds:.2f} s exposed)",
        f"throughput  {plan.tokens_per_step:,} tokens/step, {plan.tokens_per_second:,.0f} tokens/s "
        f"({plan.tokens_per_second / plan.world:,.0f} per GPU); end-to-end MFU {plan.achieved_mfu:.2f}",
        f"verdict     {'FITS' if plan.fits else 'DOES NOT FIT'} in {g.memory_gib:.1f} GiB "
        f"(largest stage {plan.required_bytes / GiB:.1f} GiB)",
    ]
    return "\n".join(lines)


def suggestions(found: list, world: int, runnable: bool = True) -> str:
    """Layouts that fit (from `suggest.suggest`), as lines with the overrides that select them;
    `runnable`: whether any layout of `world` GPUs passed the layout checks."""
    if not found and not runnable:
        return (f"no tp/pp/vpp layout of {world} GPUs passes the layout checks (attention heads "
                f"and query groups divisible by tp, decoder layers by pp, train.global_batch_size "
                f"by data.micro_batch_size x dp): try another --nodes")
    if not found:
        return ("no tp/pp/vpp/recompute layout fits: add nodes, freeze parts of the model, or "
                "lower data.micro_batch_size / data.seq_length")
    lines = ["layouts that fit, fastest first:"]
    for cfg, plan in found:
        p, t = cfg.parallel, cfg.train
        sets = (f"parallel.tp={p.tp} parallel.pp={p.pp} parallel.vpp={p.vpp or 'null'} "
                f"parallel.sequence_parallel={str(p.sequence_parallel).lower()} "
                f"parallel.distributed_optimizer=true train.recompute={t.recompute} "
                f"parallel.first_stage_decoder_layers={p.first_stage_decoder_layers or 'null'}")
        lines.append(f"  {plan.required_bytes / GiB:5.1f} GiB, {plan.step_seconds:7.2f} s/step: "
                     f"--set " + " --set ".join(sets.split()))
    return "\n".join(lines)


def as_dict(plan: Plan) -> dict:
    """The plan's figures as plain numbers (bytes, FLOPs, seconds)."""
    return {
        "world": plan.world, "tp": plan.tp, "pp": plan.pp, "vpp": plan.vpp, "dp": plan.dp,
        "micro_batches": plan.n_micro, "params_total": plan.model.total,
        "params_trainable": plan.trainable,
        "stages": [{"index": s.index, "layers": s.layers, "params": s.params.total,
                    "params_trainable": s.params.trainable, "weights": s.memory.weights,
                    "grads": s.memory.grads, "optimizer": s.memory.optimizer,
                    "buffers": s.memory.buffers, "activations": s.memory.activations,
                    "working": s.memory.working, "total": s.memory.total,
                    "flops": s.flops.total, "seconds": s.seconds} for s in plan.stages],
        "peak_bytes": plan.peak_bytes, "required_bytes": plan.required_bytes,
        "gpu_bytes": plan.gpu.memory_bytes, "fits": plan.fits,
        "model_flops_per_step": plan.model_flops_per_step, "bubble": plan.bubble,
        "step_seconds": plan.step_seconds, "tokens_per_step": plan.tokens_per_step,
        "p2p_bytes": plan.p2p_bytes, "context_tokens": plan.context_tokens,
        "tokens_per_second": plan.tokens_per_second, "mfu": plan.mfu,
        "achieved_mfu": plan.achieved_mfu,
    }
