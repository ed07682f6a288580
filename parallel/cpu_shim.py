"""Run megatron-core on CPU over gloo.

megatron-core assumes CUDA in a handful of places. ``install()`` patches each of them, once per
process, and only when CUDA is absent; ``cuda_to_cpu()`` maps literal ``device="cuda"`` arguments
and ``Tensor.cuda()`` to CPU around megatron calls (model and optimizer construction, the
forward/backward schedule, the optimizer step, checkpoint save/load). Every patch names the
upstream site it covers; ``tests/test_cpu_shim.py`` fails when one of those sites changes.
"""

from __future__ import annotations

import contextlib
import copy
import sys

import torch
from torch.autograd.function import BackwardCFunction
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

MEGATRON_VERSION = "0.16.1"

_CPU = torch.device("cpu")
_INSTALLED = [False]
_ACTIVE = [0]  # how many `cuda_to_cpu()` blocks are open

# The originals of everything replaced, by dotted name ("torch.cuda.current_device", ...).
UPSTREAM: dict[str, object] = {}

# Modules whose `param.type() == 'torch.cuda.FloatTensor'` checks must accept CPU tensors.
TYPE_CHECK_MODULES = frozenset(
    {
        "megatron.core.optimizer.clip_grads",
        "megatron.core.optimizer.optimizer",
        "megatron.core.optimizer.distrib_optimizer",
    }
)
_CPU_TO_CUDA_TYPE = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


def check_version() -> None:
    """Raise if the installed megatron-core is not the version the patches were written against."""
    import megatron.core

    found = getattr(megatron.core, "__version__", "unknown")
    if found != MEGATRON_VERSION:
        raise RuntimeError(
            f"the CPU shim (mmpretrain/parallel/cpu_shim.py) is pinned to megatron-core "
            f"{MEGATRON_VERSION}, but megatron-core {found} is installed; re-verify its patches"
        )


def _dotted(owner) -> str:
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}"
    return owner.__name__


def _replace(owner, name: str, new, wrap=None) -> None:
    """Set `owner.name = new` once per process, keeping the original in `UPSTREAM`."""
    key = f"{_dotted(owner)}.{name}"
    if key in UPSTREAM:
        return
    UPSTREAM[key] = getattr(owner, name)
    setattr(owner, name, wrap(new) if wrap else new)


def _cpu_current_device() -> torch.device:
    return _CPU


def _noop(*args, **kwargs) -> None:
    """Stands in for `torch.cuda.synchronize`: CPU kernels are done when they return."""


def patch_current_device() -> None:
    """`torch.cuda.current_device()` answers the CPU device.

    Covers ~175 call sites of `device=torch.cuda.current_device()`, e.g.
    `megatron.core.tensor_parallel.layers.ColumnParallelLinear.__init__` and
    `megatron.core.distributed.param_and_grad_buffer._ParamAndGradBuffer.__init__`.
    """
    _replace(torch.cuda, "current_device", _cpu_current_device)


def patch_synchronize() -> None:
    """`torch.cuda.synchronize()` does nothing.

    Covers `megatron.core.dist_checkpointing.strategies.filesystem_async.FileSystemWriterAsync.
    preload_tensors`, `...strategies.async_utils.TemporalAsyncCaller.schedule_async_call`,
    `...strategies.fully_parallel.FullyParallelLoadStrategyWrapper.load` and
    `megatron.core.pipeline_parallel.p2p_communication.P2PCommunicator._communicate_shapes` /
    `_communicate` (with `batch_p2p_sync`).
    """
    _replace(torch.cuda, "synchronize", _noop)


def _cpu_get_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, device=-1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _make_cpu_tracker_class(upstream: type, default_name: str) -> type:
    class CpuRNGStatesTracker(upstream):
        """`CudaRNGStatesTracker` over the CPU default generator; same interface and attributes."""

        def add(self, name: str, seed: int) -> None:
            """Track a new generator state seeded with `seed` under `name`."""
            self._is_initialized = True
            if seed in self.seeds_:
                raise RuntimeError(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise RuntimeError(f"cuda rng state {name} already exists")
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = default_name):
            """Run the block with the CPU generator in state `name`; restore the outer state after."""
            if name not in self.states_:
                raise RuntimeError(f"cuda rng state {name} is not added")
            outer_state, outer_name = torch.get_rng_state(), self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer_state
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer_state = self.states_[outer_name]
                torch.set_rng_state(outer_state)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def patch_rng_tracker() -> None:
    """`get_cuda_rng_tracker()` returns a CPU tracker; the "CUDA" RNG state is the CPU one.

    Covers `megatron.core.tensor_parallel.random`: `CudaRNGStatesTracker.add`/`fork`
    (`torch.cuda.get_rng_state()`, `torch.cuda.manual_seed(seed)`) as built by
    `initialize_rng_tracker`, and `_get_cuda_rng_state` / `_set_cuda_rng_state`
    (`torch.cuda.random.get_rng_state`, `torch.cuda.default_generators`), used by
    `_get_all_rng_states`, `_set_all_rng_states`, `CheckpointFunction` and
    `CheckpointWithoutOutput`. `model_parallel_cuda_manual_seed(seed)` then seeds the tracker.
    """
    from megatron.core.tensor_parallel import random as mp_random

    if "megatron.core.tensor_parallel.random.CudaRNGStatesTracker" not in UPSTREAM:
        cpu_tracker = _make_cpu_tracker_class(
            mp_random.CudaRNGStatesTracker, mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME
        )
        _replace(mp_random, "CudaRNGStatesTracker", cpu_tracker)
    _replace(mp_random, "_get_cuda_rng_state", _cpu_get_rng_state)
    _replace(mp_random, "_set_cuda_rng_state", _cpu_set_rng_state)
    if not isinstance(mp_random._CUDA_RNG_STATE_TRACKER, mp_random.CudaRNGStatesTracker):
        mp_random.initialize_rng_tracker(force_reset=True)  # drop a tracker built before install


def _sequence_parallel_norm_new(cls, config, hidden_size, *args, **kwargs):
    upstream_new = UPSTREAM["megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__"]
    if not config.sequence_parallel:
        return upstream_new(cls, config, hidden_size, *args, **kwargs)
    config = copy.copy(config)
    config.sequence_parallel = False
    norm = upstream_new(cls, config, hidden_size, *args, **kwargs)
    for param in norm.parameters():
        param.sequence_parallel = True
    return norm


def patch_torch_norm_sequence_parallel() -> None:
    """`WrappedTorchNorm` accepts `config.sequence_parallel` and marks its params `sequence_parallel`.

    Covers `megatron.core.transformer.torch_norm.WrappedTorchNorm.__new__`
    (`assert not config.sequence_parallel`). The marked grads are then summed over TP by
    `megatron.core.distributed.finalize_model_grads._allreduce_non_tensor_model_parallel_grads`.
    """
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    _replace(WrappedTorchNorm, "__new__", _sequence_parallel_norm_new, wrap=staticmethod)


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    upstream_type = UPSTREAM["torch.Tensor.type"]
    if dtype is not None or kwargs:
        return upstream_type(self, dtype, non_blocking, **kwargs)
    name = upstream_type(self)
    if sys._getframe(1).f_globals.get("__name__") in TYPE_CHECK_MODULES:
        return _CPU_TO_CUDA_TYPE.get(name, name)
    return name


def patch_tensor_type_checks() -> None:
    """`Tensor.type()` answers the CUDA type name of a CPU tensor when the optimizer asks.

    Covers `megatron.core.optimizer.clip_grads.clip_grad_by_total_norm_fp32`
    (`assert param.grad.type() == 'torch.cuda.FloatTensor'`),
    `megatron.core.optimizer.optimizer.Float16OptimizerWithFloat16Params.__init__` and
    `megatron.core.optimizer.distrib_optimizer.DistributedOptimizer.
    _build_model_and_main_param_groups` (`param.type()` among the CUDA type names).
    Callers outside `TYPE_CHECK_MODULES` see the true name.
    """
    _tensor_type.__doc__ = torch.Tensor.type.__doc__
    _replace(torch.Tensor, "type", _tensor_type)


_TENSOR_CUDA, _TENSOR_TO, _TENSOR_PIN = torch.Tensor.cuda, torch.Tensor.to, torch.Tensor.pin_memory


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpu(TorchFunctionMode):
    """Maps `device="cuda"`, `device=torch.device("cuda")`, `device="cuda:N"`, `Tensor.cuda()`,
    `Tensor.to("cuda")`, `Tensor.pin_memory()` and `pin_memory=True` to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is _TENSOR_CUDA or func is _TENSOR_PIN:
            return args[0]
        if kwargs:
            if _is_cuda(kwargs.get("device")):
                kwargs = {**kwargs, "device": _CPU}
            if kwargs.get("pin_memory"):
                kwargs = {**kwargs, "pin_memory": False}
        else:
            kwargs = {}
        if func is _TENSOR_TO and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _mode_is_on() -> bool:
    return any(isinstance(mode, _CudaToCpu) for mode in _get_current_function_mode_stack())


def _backward_apply(self, *args):
    upstream_apply = UPSTREAM["torch.autograd.function.BackwardCFunction.apply"]
    if _ACTIVE[0] and not _mode_is_on():
        with _CudaToCpu():
            return upstream_apply(self, *args)
    return upstream_apply(self, *args)


def patch_autograd_backward_mode() -> None:
    """Custom autograd `backward`s run under `cuda_to_cpu()` while one is open.

    torch does not carry TorchFunctionModes into the autograd engine, so literal CUDA devices
    reached from a backward escape the mode: `megatron.core.tensor_parallel.random.
    CheckpointFunction.backward` (activation recompute) re-runs the forward, which calls
    `megatron.core.transformer.utils.get_default_causal_mask` (`device="cuda"`). Covers every
    `torch.autograd.Function.backward` through `torch.autograd.function.BackwardCFunction.apply`.
    """
    _replace(BackwardCFunction, "apply", _backward_apply)


PATCHES = (
    patch_current_device,
    patch_synchronize,
    patch_rng_tracker,
    patch_torch_norm_sequence_parallel,
    patch_tensor_type_checks,
    patch_autograd_backward_mode,
)


def install() -> None:
    """Apply every patch, once per process. Does nothing on a machine with CUDA."""
    if _INSTALLED[0] or torch.cuda.is_available():
        return
    check_version()
    for patch in PATCHES:
        patch()
    _INSTALLED[0] = True


@contextlib.contextmanager
def cuda_to_cpu():
    """Inside the block, literal CUDA devices become CPU. A plain pass-through when CUDA exists."""
    if torch.cuda.is_available():
        yield
        return
    _ACTIVE[0] += 1
    try:
        with _CudaToCpu():
            yield
    finally:
        _ACTIVE[0] -= 1
