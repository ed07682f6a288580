"""A run stopped and resumed logs the uninterrupted run's losses, for each way the optimizer's
state is saved (plain, distributed as dp_reshardable or fully_reshardable, FP8's scaling state,
after a first update skipped), with torch's Adam on CPU and with Transformer Engine's FusedAdam
on a GPU (those cases skip elsewhere, with the reason). The optimizer paths differ between the
two: megatron-core keeps Adam's step per parameter for torch's and in the param groups for TE's.
Each case first runs twice uninterrupted: a difference there is the machine's nondeterminism,
not the checkpoint's."""
import json
from pathlib import Path

import pytest
from test_gpu_te import small_te
from test_resume_exact import checkpoint_contents

import mmpretrain.train.step as step_module
from mmpretrain.config import load
from mmpretrain.model.te_specs import fp8_unavailable, te_unavailable
from mmpretrain.train.loop import train

STEPS, STOP = 5, 2  # the interrupted run stops after STOP steps, then resumes to STEPS
DISTRIBUTED = ["parallel.distributed_optimizer=true"]
CASES = {
    "plain": [],
    "dp_reshardable": DISTRIBUTED,
    "fully_reshardable": [*DISTRIBUTED, "checkpoint.optimizer_format=fully_reshardable"],
    "fp8_delayed": [*DISTRIBUTED, "train.fp8=hybrid", "train.fp8_recipe=delayed"],
}


def job(data: Path, spec: str, sets: list[str], steps: int):
    base = [s for s in small_te(data) if s != "model.spec=te"]
    return load(None, [*base, f"model.spec={spec}", "train.warmup_steps=0", "logging.every=1",
                       "logging.tensorboard=false", "train.lr_decay=constant",  # train.steps sets no decay
                       f"train.steps={steps}", *sets])


@pytest.fixture(autouse=True)
def deterministic(monkeypatch):
    monkeypatch.setenv("NVTE_ALLOW_NONDETERMINISTIC_ALGO", "0")  # TE's attention backward


def logged(run_dir: Path, key: str = "loss") -> dict[int, str]:
    """step -> the value logged for `key`, as written (a NaN equals a NaN)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: repr(rec[key]) for rec in map(json.loads, lines)}


def tensors(ckpt: Path, out: Path) -> dict:
    """The tensors a checkpoint holds (model and optimizer), read without a process group."""
    import torch

    return {k: v for k, v in checkpoint_contents(ckpt, out)["tensors"].items() if torch.is_tensor(v)}


def same_run(tmp: Path, got: Path, want: Path) -> None:
    """`got` logged `want`'s losses and ended with the same weights and optimizer state."""
    import torch

    assert logged(got) == logged(want), (logged(got), logged(want))
    last = f"checkpoints/step_{STEPS:08d}"
    a, b = tensors(got / last, tmp / "got.pt"), tensors(want / last, tmp / "want.pt")
    assert a.keys() == b.keys() and a
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def twice(data: Path, tmp: Path, spec: str, sets: list[str], run=train) -> Path:
    """The uninterrupted run, after checking that a second one logs the same losses."""
    for name in ("whole", "again"):
        run(job(data, spec, sets, STEPS), tmp / name)
    assert logged(tmp / "whole") == logged(tmp / "again"), "two uninterrupted runs differ"
    return tmp / "whole"


def skip_unless(spec: str, sets: list[str]) -> None:
    if spec == "te" and te_unavailable():
        pytest.skip(f"needs Transformer Engine on CUDA: {te_unavailable()}")
    recipe = next((s.split("=")[1] for s in sets if s.startswith("train.fp8_recipe=")), None)
    if recipe and (spec != "te" or fp8_unavailable(recipe)):
        pytest.skip(f"FP8 needs Transformer Engine: {fp8_unavailable(recipe) or 'local spec'}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("spec", ["local", "te"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(small_dataset, tmp_path, spec, case):
    sets = CASES[case]
    skip_unless(spec, sets)
    whole = twice(small_dataset, tmp_path, spec, sets)
    train(job(small_dataset, spec, sets, STOP), tmp_path / "parts")
    train(job(small_dataset, spec, sets, STEPS), tmp_path / "parts")  # resumes at STOP
    same_run(tmp_path, tmp_path / "parts", whole)


@pytest.mark.parametrize("case", ["plain", "dp_reshardable", "fully_reshardable"])
@pytest.mark.parametrize("spec", ["local", "te"])
def test_a_checkpoint_after_a_skipped_first_update_resumes_exactly(small_dataset, tmp_path,
                                                                   monkeypatch, spec, case):
    """The first step's loss is not finite, so its update is skipped and the optimizer has no
    state yet (torch's Adam creates it at its first update) when the run stops there."""
    sets = CASES[case]
    skip_unless(spec, sets)
    finite, poisoned = step_module.loss_func, [False]

    def loss_func(mask, per_token):  # one micro-batch per step
        scale, poisoned[0] = (float("inf") if poisoned[0] else 1.0), False
        return finite(mask, per_token * scale)

    def poisoned_first_step(cfg, run_dir):
        poisoned[0] = True
        train(cfg, run_dir)

    monkeypatch.setattr(step_module, "loss_func", loss_func)
    whole = twice(small_dataset, tmp_path, spec, sets, run=poisoned_first_step)
    assert logged(whole, "skipped_updates")[1] == "1"
    poisoned_first_step(job(small_dataset, spec, sets, 1), tmp_path / "parts")
    train(job(small_dataset, spec, sets, STEPS), tmp_path / "parts")  # resumes at step 1
    same_run(tmp_path, tmp_path / "parts", whole)
