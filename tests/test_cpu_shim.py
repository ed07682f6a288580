"""The megatron-core CPU shim and process-group start-up, on CPU over gloo.

Each patch has a test that reads the upstream site it covers (and fails when megatron-core
changes under it) and a test that runs the megatron code path with the patch installed.
Run as a script under torchrun, this file is the worker of the 2-process test.
"""

from __future__ import annotations

import inspect
import math
import os
import pkgutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmpretrain.parallel import cpu_shim, cuda_to_cpu, destroy_distributed, init_distributed, runtime

if torch.cuda.is_available():
    pytest.skip("the CPU shim is installed only where CUDA is absent", allow_module_level=True)

import megatron.core
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

SEED, SEQ, BATCH, VOCAB = 1234, 32, 2, 128
TOL = {"rtol": 0, "atol": 1e-5}


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
    return {"tokens": tokens, "positions": positions, "labels": torch.roll(tokens, -1, 1)}


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
    return {"logits": logits, "losses": losses, "norms": norms}


@pytest.fixture
def world_of_one():
    init_distributed(seed=SEED)
    yield
    destroy_distributed()


CURRENT_DEVICE, SYNCHRONIZE = "device=torch.cuda.current_device()", "torch.cuda.synchronize()"
SITES = {  # patch -> [(upstream site under megatron.core, the code it covers there)]
    "current_device": [
        ("tensor_parallel.layers.ColumnParallelLinear.__init__", CURRENT_DEVICE),
        ("tensor_parallel.layers.RowParallelLinear.__init__", CURRENT_DEVICE),
        ("distributed.param_and_grad_buffer._ParamAndGradBuffer.__init__", CURRENT_DEVICE),
    ],
    "synchronize": [
        ("dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync.preload_tensors", SYNCHRONIZE),
        ("dist_checkpointing.strategies.async_utils.TemporalAsyncCaller.schedule_async_call", SYNCHRONIZE),
        ("dist_checkpointing.strategies.fully_parallel.FullyParallelLoadStrategyWrapper.load", SYNCHRONIZE),
        ("pipeline_parallel.p2p_communication.P2PCommunicator._communicate_shapes", SYNCHRONIZE),
    ],
    "rng_tracker": [
        ("tensor_parallel.random.CudaRNGStatesTracker.add", "torch.cuda.get_rng_state()"),
        ("tensor_parallel.random.CudaRNGStatesTracker.add", "torch.cuda.manual_seed(seed)"),
        ("tensor_parallel.random.CudaRNGStatesTracker.fork", "_get_cuda_rng_state(graph_safe="),
        ("tensor_parallel.random._get_cuda_rng_state", "torch.cuda.random.get_rng_state(device=device)"),
        ("tensor_parallel.random._set_cuda_rng_state", "torch.cuda.default_generators[idx]"),
        ("tensor_parallel.random.initialize_rng_tracker", "base_tracker = CudaRNGStatesTracker"),
        ("tensor_parallel.random.model_parallel_cuda_manual_seed", "_CUDA_RNG_STATE_TRACKER.add("),
        ("tensor_parallel.random._get_all_rng_states", "_get_cuda_rng_state("),
    ],
    "torch_norm_sequence_parallel": [
        ("transformer.torch_norm.WrappedTorchNorm.__new__", "assert not config.sequence_parallel"),
        (
            "distributed.finalize_model_grads._allreduce_non_tensor_model_parallel_grads",
            'getattr(param, "sequence_parallel", False)',
        ),
    ],
    "tensor_type_checks": [
        (
            "optimizer.clip_grads.clip_grad_by_total_norm_fp32",
            "param.grad.type() == 'torch.cuda.FloatTensor'",
        ),
        (
            "optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__",
            "type() == 'torch.cuda.FloatTensor'",
        ),
        (
            "optimizer.distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups",
            "model_param.type() == 'torch.cuda.FloatTensor'",
        ),
    ],
    "autograd_backward_mode": [
        (
            "tensor_parallel.random.CheckpointFunction.backward",
            "outputs = ctx.run_function(*detached_inputs)",
        ),
    ],
    "cuda_to_cpu": [
        ("transformer.utils.get_default_causal_mask", 'device="cuda"'),
        ("pipeline_parallel.schedules.forward_backward_no_pipelining", 'device="cuda"'),
        ("optimizer.optimizer.FP32Optimizer.__init__", "device='cuda'"),
        ("optimizer.clip_grads.get_grad_norm_fp32", "device='cuda'"),
        ("optimizer.clip_grads.clip_grad_by_total_norm_fp32", "device='cuda'"),
    ],
}
SITE_CASES = [(patch, site, code) for patch, sites in SITES.items() for site, code in sites]


def resolve(site: str):
    """The upstream object at `megatron.core.<site>`, as it was before the shim replaced it."""
    dotted = "megatron.core." + site
    head, _, attr = dotted.rpartition(".")
    if dotted in cpu_shim.UPSTREAM:
        return cpu_shim.UPSTREAM[dotted]
    if head in cpu_shim.UPSTREAM:
        return getattr(cpu_shim.UPSTREAM[head], attr)
    return pkgutil.resolve_name(dotted)


@pytest.mark.parametrize(("patch", "site", "code"), SITE_CASES, ids=[f"{p}-{s}" for p, s, _ in SITE_CASES])
def test_upstream_site_unchanged(patch, site, code):
    cpu_shim.install()
    obj = resolve(site)
    assert code in inspect.getsource(obj), f"{site} changed under the `{patch}` patch of the CPU shim"
    if patch == "tensor_type_checks":
        assert obj.__module__ in cpu_shim.TYPE_CHECK_MODULES


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
    assert cpu_shim.UPSTREAM == patched and cpu_shim._INSTALLED[0]
    assert torch.cuda.current_device is cpu_shim._cpu_current_device
    names = {f"patch_{patch}" for patch in SITES if patch != "cuda_to_cpu"}
    assert names == {patch.__name__ for patch in cpu_shim.PATCHES}  # every patch has its sites


def test_current_device_patched(world_of_one):
    assert torch.cuda.current_device() == torch.device("cpu")
    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)  # GPU-style init
    layer = tensor_parallel.ColumnParallelLinear(8, 16, config=config, init_method=torch.nn.init.ones_)
    assert layer.weight.device.type == "cpu" and torch.equal(layer.weight, torch.ones(16, 8))


def test_synchronize_patched():
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    cpu_shim.install()
    assert torch.cuda.synchronize() is None
    buckets = [("f", "k", ([], [("item", torch.ones(2))]))]
    with cuda_to_cpu():
        [(_, _, (_, [(_, tensor)]))] = FileSystemWriterAsync.preload_tensors(buckets, non_blocking=True)
    assert torch.equal(tensor, torch.ones(2))


def _dropout_mask(tracker) -> torch.Tensor:
    with tracker.fork():
        return torch.nn.functional.dropout(torch.ones(256), p=0.5)


def test_rng_tracker_patched(world_of_one):
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, resolve("tensor_parallel.random.CudaRNGStatesTracker"))
    assert tracker.is_initialized()
    assert set(tracker.get_states()) == {"data-parallel-rng", "model-parallel-rng", "expert-parallel-rng"}
    expected = torch.Generator().manual_seed(7 + 2718).get_state()  # tp_rank 0
    assert torch.equal(tracker.get_states()["model-parallel-rng"], expected)

    outer, states = torch.get_rng_state(), tracker.get_states()
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


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_torch_norm_patched(normalization):
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    cpu_shim.install()
    kw = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "normalization": normalization}
    config = TransformerConfig(tensor_model_parallel_size=2, sequence_parallel=True, **kw)
    norm = WrappedTorchNorm(config, 8)
    assert config.sequence_parallel  # the caller's config is untouched
    assert all(p.sequence_parallel for p in norm.parameters())
    plain = WrappedTorchNorm(TransformerConfig(**kw), 8)
    assert not any(hasattr(p, "sequence_parallel") for p in plain.parameters())


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


def test_backward_mode_patched():
    class MakesCudaInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return grad * torch.full((1,), 2.0, device="cuda")

    cpu_shim.install()
    x = torch.ones(3, requires_grad=True)
    with cuda_to_cpu():
        MakesCudaInBackward.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_single_process_training(world_of_one):
    assert (runtime.rank(), runtime.world_size(), runtime.is_rank0()) == (0, 1, True)
    model, optimizer = tiny_gpt(dropout=0.1)
    losses, norms = train(model, optimizer, steps=3)
    assert all(math.isfinite(v) for v in losses + norms)
    assert losses[2] < losses[1] < losses[0]


def test_destroy_then_reinit():
    init_distributed(seed=SEED)
    first = torch.rand(3)
    init_distributed(seed=SEED)  # same layout: only re-seeds
    assert torch.equal(torch.rand(3), first)
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
        [*cmd, __file__, str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        init_distributed(seed=SEED)
        try:
            reference = run_case()
        finally:
            destroy_distributed()
        output = worker.communicate(timeout=240)[0].decode(errors="replace")
    finally:
        if worker.poll() is None:  # the launcher and its two ranks share a fresh process group
            os.killpg(worker.pid, signal.SIGKILL)
    assert worker.returncode == 0, output[-4000:]
    for rank in (0, 1):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(results) == {"tp2", "tp2_sp", "dp2_distopt"}
        for name, got in results.items():
            torch.testing.assert_close(got["logits"], reference["logits"], **TOL, msg=name)
            torch.testing.assert_close(got["losses"], reference["losses"], **TOL, msg=name)
            torch.testing.assert_close(got["norms"], reference["norms"], **TOL, msg=name)


def _worker(out_dir: Path) -> None:
    init_distributed(tp=2, seed=SEED, timeout_s=120)
    results = {"tp2": run_case(tp=2), "tp2_sp": run_case(tp=2, sp=True)}
    destroy_distributed()
    init_distributed(tp=1, seed=SEED, timeout_s=120)
    assert parallel_state.get_data_parallel_world_size() == 2
    results["dp2_distopt"] = run_case(dist_opt=True)
    torch.save(results, out_dir / f"rank{runtime.rank()}.pt")
    destroy_distributed()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
