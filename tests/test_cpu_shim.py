"""The megatron-core CPU shim and process-group start-up, on CPU over gloo.

Each patch has a test that reads the upstream site it covers (and fails when megatron-core
changes under it) and a test that runs the megatron code path with the patch installed.
Run as a script under torchrun, this file is the worker of the 2-process test.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmpretrain.parallel import cpu_shim, cuda_to_cpu, destroy_distributed, init_distributed, runtime

if torch.cuda.is_available():
    pytest.skip("the CPU shim is installed only where CUDA is absent", allow_module_level=True)

import megatron.core  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import (  # noqa: E402
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.transformer import TransformerConfig  # noqa: E402

SEED, SEQ, BATCH, VOCAB = 1234, 32, 2, 128
TOL = dict(rtol=0, atol=1e-5)


def source(obj) -> str:
    return inspect.getsource(obj)


def upstream(name: str):
    return cpu_shim.UPSTREAM[name]


# ------------------------------------------------------------------ a tiny GPT, TP=1 or TP=2


def tiny_gpt(tp: int = 1, sp: bool = False, dist_opt: bool = False, dropout: float = 0.0):
    """GPTModel (local spec, fp32) wrapped in megatron DDP, with megatron's Adam."""
    config = TransformerConfig(
        num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
        use_cpu_initialization=True, params_dtype=torch.float32, tensor_model_parallel_size=tp,
        sequence_parallel=sp, hidden_dropout=dropout, attention_dropout=dropout,
    )  # fmt: skip
    config.finalize_model_grads_func = finalize_model_grads
    model = GPTModel(config, get_gpt_layer_local_spec(), vocab_size=VOCAB, max_sequence_length=SEQ)
    ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=dist_opt)
    model = DistributedDataParallel(config, ddp_config, model)
    opt_config = OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=1.0, use_distributed_optimizer=dist_opt)
    with cuda_to_cpu():
        optimizer = get_megatron_optimizer(opt_config, [model])
    return model, optimizer


def batch() -> dict:
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    return dict(tokens=tokens, positions=positions, labels=torch.roll(tokens, -1, 1))


def forward_step(data_iterator, model):
    data = next(data_iterator)
    per_token = model(data["tokens"], data["positions"], None, labels=data["labels"])  # [b, s]

    def loss_func(output):
        loss = output.float().mean()
        return loss, {"loss": loss.detach()}

    return per_token, loss_func


def train(model, optimizer, steps: int) -> tuple[list[float], list[float]]:
    """`steps` optimizer steps through megatron's schedule; the losses and grad norms."""
    schedule = get_forward_backward_func()
    losses, norms = [], []
    for _ in range(steps):
        with cuda_to_cpu():
            model.zero_grad_buffer()
            optimizer.zero_grad()
            out = schedule(
                forward_step_func=forward_step, data_iterator=iter([batch()]), model=[model],
                num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH,
            )  # fmt: skip
            _, grad_norm, _ = optimizer.step()
        losses.append(out[0]["loss"].item())
        norms.append(grad_norm)
    return losses, norms


def full_logits(model) -> torch.Tensor:
    """Logits gathered over TP: [b, s, vocab]."""
    data = batch()
    with torch.no_grad(), cuda_to_cpu():
        logits = model(data["tokens"], data["positions"], None)  # [b, s, vocab / tp]
        return tensor_parallel.gather_from_tensor_model_parallel_region(logits)


def run_case(tp: int = 1, sp: bool = False, dist_opt: bool = False) -> dict:
    runtime.seed_everything(SEED)
    model, optimizer = tiny_gpt(tp, sp, dist_opt)
    logits = full_logits(model)
    losses, norms = train(model, optimizer, steps=2)
    return dict(logits=logits, losses=losses, norms=norms)


@pytest.fixture
def world_of_one():
    init_distributed(seed=SEED)
    yield
    destroy_distributed()


# ------------------------------------------------------------------ version pin


def test_version_pin(monkeypatch):
    assert megatron.core.__version__ == cpu_shim.MEGATRON_VERSION == "0.16.1"
    monkeypatch.setattr(megatron.core, "__version__", "0.17.0")
    monkeypatch.setattr(cpu_shim, "_INSTALLED", [False])
    with pytest.raises(RuntimeError, match=r"0\.16\.1.*0\.17\.0"):
        cpu_shim.install()


def test_install_is_idempotent():
    cpu_shim.install()
    patched = dict(cpu_shim.UPSTREAM)
    cpu_shim.install()
    for patch in cpu_shim.PATCHES:
        patch()
    assert cpu_shim.UPSTREAM == patched and cpu_shim.is_installed()
    assert torch.cuda.current_device is cpu_shim._cpu_current_device


# ------------------------------------------------------------------ torch.cuda.current_device


def test_current_device_upstream_sites():
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBuffer
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    for site in (ColumnParallelLinear.__init__, RowParallelLinear.__init__, _ParamAndGradBuffer.__init__):
        assert "device=torch.cuda.current_device()" in source(site)
    original = upstream("torch.cuda.current_device")
    assert (original.__module__, original.__name__) == ("torch.cuda", "current_device")


def test_current_device_patched(world_of_one):
    assert torch.cuda.current_device() == torch.device("cpu")
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)  # GPU-style init
    layer = tensor_parallel.ColumnParallelLinear(8, 16, config=config, init_method=torch.nn.init.ones_)
    assert layer.weight.device.type == "cpu" and torch.equal(layer.weight, torch.ones(16, 8))


# ------------------------------------------------------------------ torch.cuda.synchronize


def test_synchronize_upstream_sites():
    from megatron.core.dist_checkpointing.strategies import async_utils, filesystem_async, fully_parallel
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    for site in (
        filesystem_async.FileSystemWriterAsync.preload_tensors,
        async_utils.TemporalAsyncCaller.schedule_async_call,
        fully_parallel.FullyParallelLoadStrategyWrapper.load,
        P2PCommunicator._communicate_shapes,
    ):
        assert "torch.cuda.synchronize()" in source(site)


def test_synchronize_patched():
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    cpu_shim.install()
    assert torch.cuda.synchronize() is None
    buckets = [("f", "k", ([], [("item", torch.ones(2))]))]
    with cuda_to_cpu():
        [(_, _, (_, [(_, tensor)]))] = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    assert torch.equal(tensor, torch.ones(2))


# ------------------------------------------------------------------ RNG tracker


def test_rng_tracker_upstream_sites():
    from megatron.core.tensor_parallel import random as mp_random

    tracker = upstream("megatron.core.tensor_parallel.random.CudaRNGStatesTracker")
    assert "torch.cuda.get_rng_state()" in source(tracker.add)
    assert "torch.cuda.manual_seed(seed)" in source(tracker.add)
    assert "_get_cuda_rng_state(graph_safe=" in source(tracker.fork)
    get_state = upstream("megatron.core.tensor_parallel.random._get_cuda_rng_state")
    set_state = upstream("megatron.core.tensor_parallel.random._set_cuda_rng_state")
    assert "torch.cuda.random.get_rng_state(device=device)" in source(get_state)
    assert "torch.cuda.default_generators[idx]" in source(set_state)
    assert "base_tracker = CudaRNGStatesTracker" in source(mp_random.initialize_rng_tracker)
    assert "_CUDA_RNG_STATE_TRACKER.add(" in source(mp_random.model_parallel_cuda_manual_seed)
    assert "_get_cuda_rng_state(" in source(mp_random._get_all_rng_states)
    assert "_set_all_rng_states(*ctx.rng_states)" in source(mp_random.CheckpointFunction.backward)


def _dropout_mask(tracker) -> torch.Tensor:
    with tracker.fork():
        return torch.nn.functional.dropout(torch.ones(256), p=0.5)


def test_rng_tracker_patched(world_of_one):
    upstream_class = upstream("megatron.core.tensor_parallel.random.CudaRNGStatesTracker")
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, upstream_class) and tracker.is_initialized()
    assert set(tracker.get_states()) == {"data-parallel-rng", "model-parallel-rng", "expert-parallel-rng"}
    expected = torch.Generator().manual_seed(7 + 2718).get_state()  # tp_rank 0
    assert torch.equal(tracker.get_states()["model-parallel-rng"], expected)

    outer = torch.get_rng_state()
    states = tracker.get_states()
    first = _dropout_mask(tracker)
    assert torch.equal(torch.get_rng_state(), outer)  # fork() restores the default stream
    assert not torch.equal(_dropout_mask(tracker), first)  # the forked stream advanced
    tracker.set_states(states)
    assert torch.equal(_dropout_mask(tracker), first)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    assert torch.equal(_dropout_mask(tensor_parallel.get_cuda_rng_tracker()), first)
    tracker.reset()
    assert not tracker.is_initialized() and tracker.get_states() == {}


def test_activation_recompute_replays_dropout(world_of_one):
    tracker = tensor_parallel.get_cuda_rng_tracker()

    def block(x):
        with tracker.fork():
            return torch.nn.functional.dropout(x, p=0.5) * 3  # kept: 2 * 3 = 6

    x = torch.ones(256, requires_grad=True)
    with cuda_to_cpu():
        y = tensor_parallel.checkpoint(block, False, x)
        y.sum().backward()
    assert 0 < int((y != 0).sum()) < 256
    assert torch.equal(x.grad, (y != 0).float() * 6)  # the recompute drew the same mask


# ------------------------------------------------------------------ WrappedTorchNorm + SP


def test_torch_norm_upstream_sites():
    fmg = importlib.import_module("megatron.core.distributed.finalize_model_grads")
    assert "assert not config.sequence_parallel" in source(
        upstream("megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__")
    )
    assert 'getattr(param, "sequence_parallel", False)' in source(
        fmg._allreduce_non_tensor_model_parallel_grads
    )


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_torch_norm_patched(normalization):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cpu_shim.install()
    kw = dict(num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization)
    config = TransformerConfig(tensor_model_parallel_size=2, sequence_parallel=True, **kw)
    norm = WrappedTorchNorm(config, 8)
    assert config.sequence_parallel  # the caller's config is untouched
    assert all(p.sequence_parallel for p in norm.parameters())
    plain = WrappedTorchNorm(TransformerConfig(**kw), 8)
    assert not any(hasattr(p, "sequence_parallel") for p in plain.parameters())


# ------------------------------------------------------------------ param.type() checks


def test_tensor_type_upstream_sites():
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    sites = (
        clip_grads.clip_grad_by_total_norm_fp32,
        optimizer.Float16OptimizerWithFloat16Params.__init__,
        distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups,
    )
    for site in sites:
        assert "type() == 'torch.cuda.FloatTensor'" in source(site)
        assert site.__module__ in cpu_shim.TYPE_CHECK_MODULES
    assert "'torch.cuda.BFloat16Tensor'" in source(sites[1])


def test_tensor_type_patched():
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    cpu_shim.install()
    assert torch.zeros(1).type() == "torch.FloatTensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64
    as_optimizer = {"__name__": "megatron.core.optimizer.optimizer", "t": torch.zeros(1)}
    assert eval("t.type()", as_optimizer) == "torch.cuda.FloatTensor"
    assert eval("t.bfloat16().type()", as_optimizer) == "torch.cuda.BFloat16Tensor"
    param = torch.nn.Parameter(torch.zeros(4))
    param.grad = torch.full((4,), 10.0)
    with cuda_to_cpu():
        clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=20.0)
    assert torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-6)


# ------------------------------------------------------------------ literal CUDA devices


def test_cuda_literal_upstream_sites():
    from megatron.core.optimizer import clip_grads, optimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.transformer import utils

    assert 'device="cuda"' in source(utils.get_default_causal_mask)
    assert 'device="cuda"' in source(schedules.forward_backward_no_pipelining)
    assert "device='cuda'" in source(optimizer.FP32Optimizer.__init__)
    assert "device='cuda'" in source(clip_grads.clip_grad_by_total_norm_fp32)
    assert "device='cuda'" in source(clip_grads.get_grad_norm_fp32)


def test_cuda_to_cpu_maps_devices():
    from megatron.core.transformer.utils import get_default_causal_mask

    cpu_shim.install()
    x = torch.ones(2)
    with cuda_to_cpu():
        made = [
            torch.zeros(2, device="cuda"), torch.ones(2, device=torch.device("cuda")),
            torch.tensor([1.0], device="cuda:1"), torch.empty(2, pin_memory=True),
            x.to("cuda"), x.to(device="cuda:0", dtype=torch.float64), x.cuda(), x.pin_memory(),
            get_default_causal_mask(4),
        ]  # fmt: skip
        assert x.cuda() is x
    assert all(t.device.type == "cpu" for t in made)
    assert made[5].dtype == torch.float64
    with pytest.raises(RuntimeError):  # outside the block nothing is mapped
        torch.zeros(1, device="cuda")


def test_backward_upstream_site_and_patch():
    from megatron.core.tensor_parallel.random import CheckpointFunction

    assert "outputs = ctx.run_function(*detached_inputs)" in source(CheckpointFunction.backward)
    cpu_shim.install()

    class MakesCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full((1,), 2.0, device="cuda")

    x = torch.ones(3, requires_grad=True)
    with cuda_to_cpu():
        MakesCudaInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


# ------------------------------------------------------------------ end to end


def test_single_process_training(world_of_one):
    assert (runtime.rank(), runtime.world_size(), runtime.is_rank0()) == (0, 1, True)
    model, optimizer = tiny_gpt(dropout=0.1)
    losses, norms = train(model, optimizer, steps=3)
    assert all(math.isfinite(v) for v in losses + norms)
    assert losses[2] < losses[1] < losses[0]


def test_destroy_then_reinit():
    init_distributed(seed=SEED)
    init_distributed(seed=SEED)  # same layout: nothing to do
    with pytest.raises(RuntimeError, match="already initialised"):
        init_distributed(tp=2)
    destroy_distributed()
    destroy_distributed()
    assert not torch.distributed.is_initialized()
    assert not parallel_state.model_parallel_is_initialized()
    init_distributed(seed=SEED)
    try:
        assert parallel_state.get_tensor_model_parallel_world_size() == 1
        assert full_logits(tiny_gpt()[0]).shape == (BATCH, SEQ, VOCAB)
    finally:
        destroy_distributed()


def test_two_processes_match_one(tmp_path):
    """TP=2, TP=2+SP and (after destroy and re-init) DP=2 with the distributed optimizer, in one
    2-process group, against the single-process TP=1 run from the same seed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    worker = subprocess.Popen(
        [*cmd, __file__, str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    init_distributed(seed=SEED)
    try:
        reference = run_case()
    finally:
        destroy_distributed()
    output = worker.communicate(timeout=300)[0].decode(errors="replace")
    assert worker.returncode == 0, output[-4000:]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(results) == {"tp2", "tp2_sp", "dp2_distopt"}
        for name, got in results.items():
            torch.testing.assert_close(got["logits"], reference["logits"], **TOL, msg=name)
            torch.testing.assert_close(got["losses"], reference["losses"], **TOL, msg=name)
            torch.testing.assert_close(got["norms"], reference["norms"], **TOL, msg=name)


def _worker(out_dir: Path) -> None:
    init_distributed(tp=2, seed=SEED)
    results = {"tp2": run_case(tp=2), "tp2_sp": run_case(tp=2, sp=True)}
    destroy_distributed()
    init_distributed(tp=1, seed=SEED)
    assert parallel_state.get_data_parallel_world_size() == 2
    results["dp2_distopt"] = run_case(dist_opt=True)
    torch.save(results, out_dir / f"rank{runtime.rank()}.pt")
    destroy_distributed()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
