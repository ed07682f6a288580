"""The learning-rate schedule (train.lr_decay): each step's lr against the closed form, written
here from the definitions, for every decay; the config checks of wsd."""
import math

import pytest
import torch

from mmpretrain.config import ConfigError, load
from mmpretrain.train.optim import build_scheduler

STEPS, WARMUP, LR, MIN_LR, WSD = 20, 4, 1e-3, 1e-4, 6


def lrs(*sets) -> list[float]:
    """The lr each of the STEPS updates uses (update n at the schedule's n - 1, as the loop)."""
    cfg = load(None, [f"train.steps={STEPS}", f"train.warmup_steps={WARMUP}", f"train.lr={LR}",
                      f"train.min_lr={MIN_LR}", *sets])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(STEPS):
        out.append(opt.param_groups[0]["lr"])
        sched.step(1)
    return out


def expected(decay: str, style: str = "linear") -> list[float]:
    last = STEPS - 1  # the last update is at schedule index STEPS - 1
    out = []
    for i in range(STEPS):
        if i <= WARMUP:
            out.append(LR * i / WARMUP)
            continue
        t = (i - WARMUP) / (last - WARMUP)  # 0 after the warmup, 1 at the last update
        if decay == "cosine":
            coeff = 0.5 * (1 + math.cos(math.pi * t))
        elif decay == "linear":
            coeff = 1 - t
        elif decay == "constant":
            coeff = 1.0
        else:  # wsd: the last WSD updates decay
            u = max(0, i - (last - WSD)) / WSD
            coeff = {"linear": 1 - u, "cosine": 0.5 * (1 + math.cos(math.pi * u)),
                     "exponential": 2 * 0.5 ** u - 1, "minus_sqrt": 1 - math.sqrt(u)}[style]
        out.append(LR if decay == "constant" else MIN_LR + (LR - MIN_LR) * coeff)
    return out


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_decay_follows_its_formula(decay):
    got = lrs(f"train.lr_decay={decay}")
    assert got == pytest.approx(expected(decay), rel=1e-12, abs=1e-15)
    assert got[0] == 0.0 and got[WARMUP] == pytest.approx(LR)
    assert got[-1] == pytest.approx(LR if decay == "constant" else MIN_LR)


def test_cosine_is_the_default():
    assert lrs() == lrs("train.lr_decay=cosine")


@pytest.mark.parametrize("style", ["linear", "cosine", "exponential", "minus_sqrt"])
def test_wsd_holds_lr_then_decays_over_its_last_steps(style):
    got = lrs("train.lr_decay=wsd", f"train.wsd_decay_steps={WSD}", f"train.wsd_decay_style={style}")
    assert got == pytest.approx(expected("wsd", style), rel=1e-12, abs=1e-15)
    stable = got[WARMUP:STEPS - WSD]
    assert stable == [pytest.approx(LR)] * len(stable)
    assert all(a > b for a, b in zip(got[STEPS - WSD - 1:], got[STEPS - WSD:]))  # WSD decaying
    assert got[-1] == pytest.approx(MIN_LR)


@pytest.mark.parametrize("steps", [0, STEPS - 1 - WARMUP + 1, STEPS + 5])
def test_wsd_decay_must_fit_after_the_warmup(steps):
    sets = [f"train.steps={STEPS}", f"train.warmup_steps={WARMUP}", "train.lr_decay=wsd"]
    with pytest.raises(ConfigError, match="train.wsd_decay_steps: .* 1 to 15 steps"):
        load(None, [*sets, f"train.wsd_decay_steps={steps}"])
    load(None, [*sets, f"train.wsd_decay_steps={STEPS - 1 - WARMUP}"])  # the longest: 15


def test_unknown_decay_is_a_config_error():
    with pytest.raises(ConfigError, match="train.lr_decay"):
        load(None, ["train.lr_decay=step"])


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(caplog):
    cfg = load(None, ["train.steps=6", "train.warmup_steps=10", f"train.lr={LR}"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    with caplog.at_level("WARNING", logger="mmpretrain"):
        sched = build_scheduler(opt, cfg)
    assert "train.warmup_steps 10: a run of 6 steps warms up over 4" in caplog.text
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        sched.step(1)
    assert seen[:5] == pytest.approx([LR * i / 4 for i in range(5)])
