"""A training step never waits for the GPU inside the model: the forward reads no value of a tensor
that lives on the device (sizes, offsets and counts come from the batch's host copy) and the
backward runs no operation whose output size depends on tensor values.

On CPU, "on the device" is a tensor subclass: the moved batch's tensors, and every tensor the model
computes from them, are `OnDevice`; a value read from one of them is recorded with its call site.
"""
import sys
import traceback
from dataclasses import fields

import pytest
import torch
from mmpretrain.data import packing
from mmpretrain.data.packing import PackedBatch, pack_rows
from mmpretrain.data.sequence import build_sequence
from mmpretrain.parallel import cuda_to_cpu
from test_cross_attention import SEQ, Tok, build, config, image, sample, seq_h, seq_x
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that make the host wait for the device: a value read on the host, or an output whose
# size depends on tensor values.
READS = {"item", "tolist", "__int__", "__float__", "__bool__", "__index__", "cpu", "numpy",
         "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount"}
SIZED = {"nonzero", "_local_scalar_dense", "masked_select", "unique_consecutive", "_unique2",
         "bincount"}


def _site() -> str:
    """The innermost frame outside torch: the line that asked for the value."""
    frames = [f for f in traceback.extract_stack()[:-2]
              if "/torch/" not in f.filename and not f.filename.endswith("cpu_shim.py")]
    return f"{frames[-1].filename.rsplit('/', 2)[-1]}:{frames[-1].lineno}" if frames else "?"


def _bool_index(index) -> bool:
    index = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)


def _waits(name: str, args, kwargs) -> bool:
    """Whether `name`(args) makes the host wait for a device tensor's value."""
    if name in READS:
        return True
    if name == "to":  # to the host
        return any(torch.device(a).type == "cpu" for a in [*args[1:], kwargs.get("device")]
                   if isinstance(a, (str, torch.device)))
    if name == "repeat_interleave":  # tensor repeats: the output size is their sum
        return isinstance(args[-1] if len(args) > 1 else kwargs.get("repeats"), torch.Tensor) \
            and kwargs.get("output_size") is None
    if name == "__getitem__":
        return _bool_index(args[1])
    if name == "__setitem__":  # a scalar through a boolean mask runs as masked_fill
        value = args[2]
        scalar = isinstance(value, (int, float)) or (isinstance(value, torch.Tensor)
                                                     and value.numel() == 1)
        return _bool_index(args[1]) and not scalar
    if name == "where":
        return len(args) + len(kwargs) == 1
    return False


class Marked(torch.Tensor):
    """A tensor marked as living on the host or on the device (the subclass says which)."""

    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if OnDevice in types and OnHost in types:  # would fail on a GPU: two devices in one op
            Marked.seen.append(f"{name} mixes host and device at {_site()}")
            cls, types = OnDevice, (OnDevice,)  # go on as if on the device
        elif OnDevice in types and _waits(name, args, kwargs):
            Marked.seen.append(f"{name} at {_site()}")
        return torch.Tensor.__torch_function__.__func__(cls, func, types, args, kwargs)


class OnDevice(Marked):
    """'On the device': reading its values is recorded in `Marked.seen`."""


class OnHost(Marked):
    """The host batch and what is computed from it: reading it is free."""


class BackwardReads(TorchDispatchMode):
    """Records the value-sized operations the backward runs (all of it runs on the device)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[1]
        sized = name in SIZED or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                  and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point())
        if sized or (name.startswith("index") and len(args) > 1 and _bool_index(args[1])):
            self.seen.append(name)
        return func(*args, **kwargs)


def to_device(t: torch.Tensor, device=None) -> torch.Tensor:
    return t.as_subclass(torch.Tensor).clone().as_subclass(OnDevice)


@pytest.fixture
def fake_device(monkeypatch):
    """Every host-to-device copy of the model's modules lands `OnDevice`."""
    original = packing.on_device
    patched = [m for m in list(sys.modules.values()) if getattr(m, "on_device", None) is original]
    assert {"mmpretrain.data.packing", "mmpretrain.model.projector",
            "mmpretrain.model.packed_attention"} <= {m.__name__ for m in patched}
    for module in patched:
        monkeypatch.setattr(module, "on_device", to_device)
    Marked.seen = []
    yield


def moved(batch: PackedBatch) -> PackedBatch:
    """`batch.to(device)` with every tensor `OnDevice`, its host copy's `OnHost`."""
    host = PackedBatch(**{f.name: getattr(batch, f.name).as_subclass(OnHost)
                          for f in fields(batch)})
    out = host.to("cpu")
    assert out.host is host and isinstance(out.tokens, OnDevice)
    return out


def batch_of(design: str) -> PackedBatch:
    if design == "h":
        rows = [[seq_h("ab", (2, 2), "cd")], [seq_h("e", (2, 2), "fg"), seq_h("h", (2, 2), "i")]]
    elif design == "x":
        rows = [[seq_x("ab", (2, 4), "cd", (2, 2), "x")], [seq_x("e", (4, 2), "fg")]]
    else:
        def seq_d(*segments):
            return build_sequence(sample(*segments), Tok(), image, 2, "d")
        rows = [[seq_d("ab", (2, 4), "cd", (2, 2), "x")], [seq_d("e", (4, 2), "fg")]]
    return pack_rows(rows, SEQ, 0)


def model_of(design: str):
    """The local spec with thd packed attention; D also through the projector's merge."""
    cfg = config(design, packed_attention="thd", spec="local")
    cfg.projector.merge = 2 if design == "d" else 1
    return build(cfg)


@pytest.mark.parametrize("design", ["d", "x", "h"])
def test_step_reads_no_device_value(megatron_world, fake_device, design):
    model = model_of(design)
    batch = batch_of(design)
    with cuda_to_cpu():
        loss = model(moved(batch))
    assert isinstance(loss, OnDevice)
    assert Marked.seen == [], f"the forward read device values: {Marked.seen}"
    with BackwardReads() as reads:
        loss.sum().backward()
    assert reads.seen == [], f"the backward ran value-sized operations: {reads.seen}"
    with cuda_to_cpu():  # the same loss as the batch left on the host
        torch.testing.assert_close(loss.as_subclass(torch.Tensor), model(batch), rtol=0, atol=0)


def test_the_detector_sees_reads(fake_device):
    x = to_device(torch.tensor([1, 0, 2]))
    int(x.max()), x[x > 0], x.nonzero(), x.repeat_interleave(x)  # four reads
    x.repeat_interleave(x, output_size=3)  # not a read
    x[x > 1] = 0  # a scalar through a mask: masked_fill, not a read
    torch.arange(3).as_subclass(OnHost) + x  # two devices in one op
    assert [s.split(" ")[0] for s in Marked.seen] == [
        "__int__", "__getitem__", "nonzero", "repeat_interleave", "add"]
    assert "mixes host and device" in Marked.seen[-1]
    with BackwardReads() as reads:
        w = torch.ones(3, requires_grad=True)
        (w[torch.tensor([True, False, True])].sum()).backward()
    assert reads.seen  # the backward of a boolean index is sized by the mask


@pytest.mark.skipif(not torch.cuda.is_available(), reason="waits for a CUDA device are counted "
                    "on one (torch's sync debug mode)")  # (TE's own: gpu_step.py --profile)
@pytest.mark.parametrize("design", ["d", "x", "h"])
def test_gpu_step_waits_for_nothing(megatron_world, design):
    model, batch = model_of(design), batch_of(design)
    model(batch.to("cuda")).sum().backward()  # warm: allocator, pinned host blocks, kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a synchronizing call raises
    try:
        model(batch.to("cuda")).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
