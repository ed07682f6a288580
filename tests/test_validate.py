"""Held-out loss during training (`train.eval_every`): it equals `mmpretrain eval` of the same
checkpoint on the same samples, in one process and under a pipelined, data-parallel layout; the
empty micro-batches that even out the ranks' counts change nothing; bad samples are skipped."""
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from mmpretrain.data.sequence import SampleError
from mmpretrain.data.shards import ShardError

from mmpretrain.config import ConfigError, load
from mmpretrain.dataset import make_loader, open_tokenizer
from mmpretrain.train.fp8_state import fp8_scaling_kept
from mmpretrain.train.loop import setup
from mmpretrain.train.validate import HeldoutLoss, pack_samples, read_samples

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SMALL = ["data.seq_length=128", "data.micro_batch_size=2", "data.image_token_budget=16",
         "train.global_batch_size=4", "train.warmup_steps=0", "logging.every=100"]


def train_cli(world: int, run: Path, data: Path, job: str, sets: list[str]) -> None:
    launch = [sys.executable, "-m", "mmpretrain"] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
        str(world), "-m", "mmpretrain"]
    args = ["train", job, "--run-dir", str(run)]
    for s in [f"data.path={data}", *SMALL, *sets]:
        args += ["--set", s]
    r = subprocess.run(launch + args, cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def eval_cli(run: Path, samples: int) -> dict:
    r = subprocess.run([sys.executable, "-m", "mmpretrain", "eval", "--run", str(run),
                        "--samples", str(samples)], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def records(run: Path) -> dict[int, dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {(rec := json.loads(x))["step"]: rec for x in lines}


@pytest.mark.parametrize("world, job, sets", [
    (1, "jobs/tiny-d.yaml", []),
    (4, "jobs/tiny-x.yaml", ["parallel.pp=2", "parallel.vpp=2", "data.max_patches=64",
                             "model.cross_attention_layers=[1,3]", "decoder.num_layers=4",
                             "train.global_batch_size=8"]),
], ids=["d-one-process", "x-pp2-vpp2-dp2"])
def test_heldout_loss_is_that_of_mmpretrain_eval(tmp_path, small_dataset, world, job, sets):
    run = tmp_path / "run"
    train_cli(world, run, small_dataset, job,
              ["train.steps=4", "train.eval_every=2", "train.eval_samples=15", *sets])
    recs = records(run)
    assert sorted(s for s, r in recs.items() if "eval/loss" in r) == [2, 4]
    assert all(math.isfinite(recs[s]["eval/loss"]) for s in (2, 4))
    if world == 1:  # evaluating changes nothing in training: the same losses without it
        train_cli(1, tmp_path / "plain", small_dataset, job, ["train.steps=4", *sets])
        plain = records(tmp_path / "plain")
        assert [recs[s]["loss"] for s in (1, 4)] == [plain[s]["loss"] for s in (1, 4)]
    if not torch.cuda.is_available():  # peak GPU memory is logged on a GPU only
        assert not any(k.startswith("memory/") for k in recs[4])
    ref = eval_cli(run, 15)  # the step-4 checkpoint, one process; under dp2 the ranks pack
    # 8 and 7 samples into 3 and 2 micro-batches, evened out and rounded to 4 for the interleaved
    # schedule with empty ones
    assert ref["samples"] == 15
    assert recs[4]["eval/loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_empty_padding_micro_batches_change_nothing(megatron_world, small_dataset):
    for design in ("d", "x", "h"):
        extra = [] if design == "d" else ["model.cross_attention_every=1"]
        if design == "h":
            extra += ["data.resize=tiles", "data.tile_size=32", "data.max_tiles=2"]
        cfg = load(None, [f"data.path={small_dataset}", *SMALL, f"model.design={design}", *extra])
        _, tok, _, ddps, _, _ = setup(cfg)
        loader = make_loader(cfg, "heldout", tok, shuffle=False)
        plain = HeldoutLoss(loader, 7, 0, 1)
        padded = HeldoutLoss(loader, 7, 0, 1, multiple=len(plain.batches) + 2)
        assert len(padded._padded()) == len(plain.batches) + 2  # two empty ones
        assert math.isfinite(a := plain(ddps, cfg.data.seq_length))
        assert padded(ddps, cfg.data.seq_length) == pytest.approx(a, rel=1e-6)
        assert all(d.training for d in ddps)  # back in training mode


def test_pack_samples_keeps_every_readable_sample_and_counts_the_rest(small_dataset):
    cfg = load(None, [f"data.path={small_dataset}", *SMALL])
    loader = make_loader(cfg, "heldout", open_tokenizer(cfg), shuffle=False)
    samples = [loader.reader[i] for i in range(9)]
    assert samples[4]["images"]
    broken = {**samples[4], "images": [b"\x00not an image" * 20] * len(samples[4]["images"])}
    batches, skipped = pack_samples(samples[:4] + [broken] + samples[5:], loader)
    assert skipped == 1
    packed = sum(int((b.sample_ids.max(dim=1).values + 1).sum()) for b in batches)
    assert packed == 8
    whole, _ = pack_samples(samples, loader)
    tokens = sum(int(b.loss_mask.sum()) for b in whole)
    assert tokens > sum(int(b.loss_mask.sum()) for b in batches) > 0


class Rows:
    """A held-out reader whose row 2 is corrupt."""

    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if i == 2:
            raise ShardError("corrupt_sample", "shard.00000.mds row 2: bad offsets")
        return self.samples[i]


def test_unreadable_rows_are_skipped_and_counted(small_dataset, caplog):
    cfg = load(None, [f"data.path={small_dataset}", *SMALL])
    loader = make_loader(cfg, "heldout", open_tokenizer(cfg), shuffle=False)
    rows = Rows([loader.reader[i] for i in range(5)])
    samples, skipped = read_samples(rows, range(5))
    assert skipped == 1 and samples == [rows[i] for i in (0, 1, 3, 4)]
    assert "held-out sample 2 skipped: shard.00000.mds row 2" in caplog.text


def test_no_text_token_to_score_is_a_config_error(megatron_world, small_dataset, monkeypatch):
    cfg = load(None, [f"data.path={small_dataset}", *SMALL])
    loader = make_loader(cfg, "heldout", open_tokenizer(cfg), shuffle=False)

    def unusable(sample):
        raise SampleError("empty", "no text")
    monkeypatch.setattr(loader.maker, "sequence", unusable)
    with pytest.raises(ConfigError, match="no text token to score .5 could not be used"):
        HeldoutLoss(loader, 5, 0, 1)


def test_eval_settings_are_checked():
    with pytest.raises(ConfigError, match="train.eval_every: must not be negative"):
        load(None, ["train.eval_every=-1"])
    with pytest.raises(ConfigError, match="train.eval_samples: must be positive"):
        load(None, ["train.eval_every=5", "train.eval_samples=0"])


def test_no_heldout_split_is_a_clear_error_at_start(tmp_path, small_dataset):
    data = tmp_path / "data"
    data.mkdir()
    (data / "tokenizer.json").write_bytes((small_dataset / "tokenizer.json").read_bytes())
    os.symlink(small_dataset / "train", data / "train")
    r = subprocess.run([sys.executable, "-m", "mmpretrain", "train", "jobs/tiny-d.yaml",
                        "--run-dir", str(tmp_path / "run"), "--set", f"data.path={data}",
                        "--set", "train.eval_every=2", "--set", "train.steps=2"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "has no heldout/ split" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


class _DelayedScaling:
    """What a Transformer Engine module keeps per direction under delayed scaling."""

    def __init__(self):
        self.amax_history, self.scale = torch.zeros(4, 3), torch.ones(3)


def test_evaluation_restores_fp8_scaling_in_place(megatron_world, small_dataset):
    """An FP8 forward pass records its input's amax in the current row of the module's amax
    history, with or without gradients. Here a forward hook on the decoder's first layer plays
    that part, on a layer given TE's delayed-scaling state (fp8_meta); after the evaluation the
    state holds its values again, in the same tensors (TE's casts hold them)."""
    cfg = load(None, [f"data.path={small_dataset}", *SMALL])
    _, tok, _, ddps, _, _ = setup(cfg)
    layer = next(m for n, m in ddps[0].named_modules() if n.endswith("language_model.block.layers.0"))
    layer.fp8_meta = {"scaling_fwd": _DelayedScaling(), "scaling_bwd": _DelayedScaling()}
    fwd = layer.fp8_meta["scaling_fwd"]
    history, scale = fwd.amax_history, fwd.scale
    calls = []

    def record_amax(module, args, output):
        calls.append(1)
        fwd.amax_history[0] = torch.maximum(fwd.amax_history[0], output[0].abs().max().detach())
        fwd.scale.mul_(0.5)
    layer.register_forward_hook(record_amax)
    HeldoutLoss(make_loader(cfg, "heldout", tok, shuffle=False), 7, 0, 1)(ddps, cfg.data.seq_length)
    assert calls  # the hook ran in the evaluation
    assert fwd.amax_history is history and fwd.scale is scale
    assert not history.any() and torch.equal(scale, torch.ones(3))


def test_state_registered_with_te_but_outside_the_module_tree_is_restored(monkeypatch):
    """TE's operation fuser (model.te_fused_mlp) keeps its ops out of the module tree; their
    delayed-scaling state is found through TE's global amax-reduction buffers (here a stand-in
    with TE's names), forward entries only."""
    fwd_history, fwd_scale, bwd_history = torch.zeros(4, 2), torch.ones(2), torch.zeros(4, 2)

    class Manager:
        global_amax_history_buffer = {"forward_k": [fwd_history], "backward_k": [bwd_history]}
        global_scale_buffer = {"forward_k": [fwd_scale]}

        @staticmethod
        def split_key_in_buffer(key):
            direction, autocast_key = key.split("_", 1)
            return direction == "forward", autocast_key
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.quantization",
                        types.SimpleNamespace(FP8GlobalStateManager=Manager))
    with fp8_scaling_kept([torch.nn.Linear(2, 2)]):
        fwd_history[0], bwd_history[0] = 3.0, 5.0
        fwd_scale.mul_(0.5)
    assert not fwd_history.any() and torch.equal(fwd_scale, torch.ones(2))
    assert bwd_history[0].eq(5.0).all()
