"""`checkpoint.CheckpointSlices`: some of a checkpoint's tensors read alone (the export's reads),
equal to a whole load, and a clear CheckpointError for what the checkpoint cannot give."""
import copy
import dataclasses
import shutil

import pytest
import torch
from hf_helpers import random_checkpoint, tiny_config, write_dataset_tokenizer

from mmpretrain.checkpoint import CheckpointError, CheckpointSlices
from mmpretrain.hf import local
from mmpretrain.hf.mapping import model_tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(checkpoint, its model on the meta device, the model loaded whole)."""
    root = tmp_path_factory.mktemp("slices")
    tok = write_dataset_tokenizer(root / "data")
    ckpt = random_checkpoint(root / "run", tiny_config(root / "data"), tok, seed=5)
    cfg = local.checkpoint_config(ckpt)
    return ckpt, local.meta_model(ckpt, cfg, tok), local.load_cpu_model(ckpt, cfg, tok)


def test_a_few_tensors_read_alone_equal_the_whole_load(saved):
    ckpt, meta, whole = saved
    request, want = meta.sharded_state_dict(), model_tensors(whole.state_dict())
    names = [n for n in want if ".layers.1." in n] + ["language_model.embedding.word_embeddings.weight"]
    assert any("linear_fc1" in n for n in names)  # SwiGLU's fc1: a factory of two saved tensors
    got = CheckpointSlices(ckpt).read({n: request[n] for n in names})
    assert sorted(got) == sorted(names)
    for n in names:
        assert got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]), n


def test_what_the_checkpoint_cannot_give_is_named(saved, tmp_path):
    ckpt, meta, _ = saved
    request = meta.sharded_state_dict()
    name = next(n for n in request if n.endswith("linear_proj.weight") and "language_model" in n)
    renamed = {name: dataclasses.replace(request[name], key="decoder.layers.no_such.weight")}
    with pytest.raises(CheckpointError, match="has no tensor decoder.layers.no_such.weight"):
        CheckpointSlices(ckpt).read(renamed)
    wider = copy.copy(request[name])
    wider.data = torch.empty(wider.data.shape[0], 2 * wider.data.shape[1], device="meta")
    wider.local_shape = tuple(wider.data.shape)
    with pytest.raises(CheckpointError, match=rf"holds {wider.key} with shape .* reads"):
        CheckpointSlices(ckpt).read({name: wider})
    damaged = tmp_path / "damaged"
    shutil.copytree(ckpt, damaged)
    for data in damaged.glob("*.distcp"):
        data.write_bytes(data.read_bytes()[:100])  # the index stays, the values are gone
    with pytest.raises(CheckpointError, match=f"checkpoint {damaged}: its tensors do not read"):
        CheckpointSlices(damaged).read({name: request[name]})
