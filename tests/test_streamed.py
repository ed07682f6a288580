"""`checkpoint.save_weights_streamed`: a checkpoint written one computed tensor at a time is the
one megatron's save writes (same index), loads equal, asks for each tensor once in the model's
order, keeps at most one file's tensors alive, and names a tensor computed with a wrong shape."""
import copy
import weakref

import pytest
import torch
from hf_helpers import randomize, tiny_config, write_dataset_tokenizer
from torch.distributed.checkpoint import FileSystemReader

from mmpretrain import checkpoint
from mmpretrain.checkpoint import CheckpointError
from mmpretrain.checkpoint.streamed import save_streamed
from mmpretrain.config import dump
from mmpretrain.hf import local
from mmpretrain.hf.mapping import model_tensors


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(root, config, tokenizer, a randomised tiny D model, the same model on the meta device)."""
    root = tmp_path_factory.mktemp("streamed")
    tok = write_dataset_tokenizer(root / "data")
    cfg = local.single_process(copy.deepcopy(tiny_config(root / "data")))
    real = local.build_cpu_model(cfg, tok)
    randomize(real, 11)
    return root, cfg, tok, real, local.build_cpu_model(cfg, tok, meta=True)


def index(ckpt):
    return FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata


def test_streamed_equals_megatrons_save(model, tmp_path):
    from mmpretrain.parallel import cuda_to_cpu

    _, cfg, tok, real, meta = model
    values, asked = model_tensors(real.state_dict()), []

    def value(name):
        asked.append(name)
        return values[name].clone()

    request = meta.sharded_state_dict()
    with cuda_to_cpu():
        ours = checkpoint.save_weights_streamed(tmp_path / "ours", 0, request, value, cfg, "test")
        theirs = checkpoint.save_weights(tmp_path / "theirs", 0, real, cfg, "test")
    assert any(k.endswith("linear_fc1.weight") for k in asked)  # a factory: two saved tensors
    assert asked == [k for k in request if k in values]  # once each, in the model's order
    assert index(ours) == index(theirs)  # keys, shapes, chunks, dtypes; the layers' objects
    dump(cfg, ours.parent.parent / "config.yaml")
    loaded = model_tensors(local.load_cpu_model(ours, local.checkpoint_config(ours), tok).state_dict())
    assert loaded.keys() == values.keys()
    for name, want in values.items():
        assert torch.equal(loaded[name], want), name


def test_at_most_one_files_tensors_are_alive(model, tmp_path):
    _, _, _, real, meta = model
    values = model_tensors(real.state_dict())
    file_bytes = 64 * 1024
    largest = max(v.numel() * v.element_size() for v in values.values())
    given, most = [], 0

    def value(name):
        nonlocal most
        alive = [r() for r in given if r() is not None]
        most = max(most, sum(t.numel() * t.element_size() for t in alive))
        out = values[name].clone()
        given.append(weakref.ref(out))
        return out

    save_streamed(tmp_path / "ckpt", meta.sharded_state_dict(), value, file_bytes=file_bytes)
    files = sorted((tmp_path / "ckpt").glob("*.distcp"))
    total = sum(v.numel() * v.element_size() for v in values.values())
    assert len(files) >= total // (file_bytes + largest)  # cut into many files
    assert most <= file_bytes + largest, (most, file_bytes, largest)  # torch's writer alone: all
    assert (tmp_path / "ckpt" / "common.pt").is_file() and (tmp_path / "ckpt" / "metadata.json").is_file()
    request = meta.sharded_state_dict()
    loaded = checkpoint.CheckpointSlices(tmp_path / "ckpt").read({k: request[k] for k in values})
    for name, want in values.items():
        assert torch.equal(loaded[name], want), name


def test_a_tensor_computed_with_a_wrong_shape_is_named(model, tmp_path):
    _, _, _, real, meta = model
    values = model_tensors(real.state_dict())
    bad = "language_model.output_layer.weight"

    def value(name):
        return values[name][:-1] if name == bad else values[name]

    with pytest.raises(CheckpointError, match=rf"{bad}: computed shape \[\d+, \d+\], the model's is"):
        save_streamed(tmp_path / "ckpt", meta.sharded_state_dict(), value)


def test_an_interrupt_stays_an_interrupt_and_leaves_no_files(model, tmp_path):
    """Ctrl-C while a tensor is computed: the KeyboardInterrupt comes through torch's writer, and
    the half-written checkpoint is removed."""
    _, cfg, _, _, meta = model

    def value(name):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_weights_streamed(tmp_path / "run", 0, meta.sharded_state_dict(), value, cfg, "t")
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
