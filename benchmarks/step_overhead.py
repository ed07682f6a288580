"""One training step of mmpretrain's decoder against a bare megatron-core GPTModel of the same
shape, on the same text-only tokens, single process on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/step_overhead.py [--reps 12]

Both models go through the same machinery (megatron DDP, megatron Adam, the no-pipelining
schedule, the same dense block-diagonal causal mask); repetitions alternate between the two so
machine noise hits both alike. Prints each median step time and the ratio (target: <= 1.10).
"""
from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
from mmpretrain.data.packing import PackedBatch
from mmpretrain.parallel import cuda_to_cpu, init_distributed

from mmpretrain.config import load
from mmpretrain.model.build import _configs, build_model_chunks
from mmpretrain.train.optim import build_optimizer, wrap_ddp
from mmpretrain.train.step import loss_func, train_step

SHAPE = ["decoder.num_layers=4", "decoder.hidden_size=256", "decoder.num_attention_heads=8",
         "decoder.num_query_groups=4", "decoder.ffn_hidden_size=1024", "data.seq_length=512",
         "data.micro_batch_size=2", "train.global_batch_size=2", "train.precision=fp32"]
VOCAB = 1024


def text_batch(cfg) -> PackedBatch:
    """Two rows of four packed text-only samples each."""
    g = torch.Generator().manual_seed(0)
    b, s = cfg.data.micro_batch_size, cfg.data.seq_length
    tokens = torch.randint(10, VOCAB, (b, s), generator=g)
    sample_ids = (torch.arange(s) // (s // 4)).repeat(b, 1)
    positions = torch.arange(s) % (s // 4)
    return PackedBatch(tokens, tokens.roll(-1, 1), torch.ones(b, s), positions.repeat(b, 1),
                       sample_ids, torch.zeros(0, 0), torch.zeros(0, 2, dtype=torch.long))


def gpt_model(cfg):
    """megatron-core's GPTModel with the decoder's config and layer spec, untied embeddings."""
    from megatron.core.models.gpt import GPTModel

    from mmpretrain.model.specs import decoder_layer_spec
    _, dcfg = _configs(cfg, "local")
    return GPTModel(dcfg, decoder_layer_spec(), vocab_size=VOCAB, max_sequence_length=cfg.data.seq_length,
                    position_embedding_type="rope", rotary_base=int(cfg.decoder.rope_theta),
                    share_embeddings_and_output_weights=False)


def gpt_forward_step(data_iterator, model):
    batch = next(data_iterator)
    out = model(batch.tokens, batch.position_ids, batch.decoder_attention_mask(), labels=batch.labels)
    return out, partial(loss_func, batch.loss_mask)


def gpt_step(ddps, optimizer, batch, seq_len):
    from megatron.core.pipeline_parallel import get_forward_backward_func
    for d in ddps:
        d.zero_grad_buffer()
    optimizer.zero_grad()
    with cuda_to_cpu():
        get_forward_backward_func()(forward_step_func=gpt_forward_step, data_iterator=iter([batch]),
                                    model=ddps, num_microbatches=1, seq_length=seq_len,
                                    micro_batch_size=batch.tokens.shape[0], forward_only=False)
        optimizer.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load(None, SHAPE)
    init_distributed(seed=0)
    batch, seq = text_batch(cfg), cfg.data.seq_length
    with cuda_to_cpu():
        ours_chunks = build_model_chunks(cfg, VOCAB, image_token_id=4)
        ours = wrap_ddp(ours_chunks, cfg)
        ours_opt = build_optimizer(ours, cfg)
        theirs = wrap_ddp([gpt_model(cfg)], cfg)
        theirs_opt = build_optimizer(theirs, cfg)
    n_ours = sum(p.numel() for p in ours_chunks[0].language_model.parameters())
    n_theirs = sum(p.numel() for p in theirs[0].module.parameters())
    assert n_ours == n_theirs, (n_ours, n_theirs)
    runs = {"mmpretrain": lambda: train_step(ours, ours_opt, [batch], seq),
            "GPTModel": lambda: gpt_step(theirs, theirs_opt, batch, seq)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for rep in range(args.reps + 2):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            if rep >= 2:  # warm-up
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"decoder: {n_ours / 1e6:.2f}M parameters, tokens per step {batch.tokens.numel()}")
    for k, v in med.items():
        print(f"{k:>10}: median step {v * 1e3:.1f} ms over {args.reps} reps")
    print(f"ratio mmpretrain / GPTModel: {med['mmpretrain'] / med['GPTModel']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
