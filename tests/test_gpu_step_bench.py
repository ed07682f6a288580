"""The GPU step benchmark (benchmarks/gpu_step.py) in its smoke mode: it runs on any device, prints
one table row per design x variant, and reports the variants this machine cannot run as skipped."""
from __future__ import annotations

import importlib.util
import inspect
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_step.py"
HAS_TE = importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


def run_smoke(*extra: str) -> dict[tuple[str, str], dict[str, str]]:
    """Run `gpu_step.py --smoke --profile 1`; the step table as {(design, variant): {column: cell}}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--dali-images", "4",
                          "--profile", "1", *extra],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    profiles = re.findall(r"profile: ([\d.]+) ms/step wall .*, ([\d.]+) ms host op time", out.stdout)
    ran = out.stdout.count("tokens/s, ")  # the variants that ran, each profiled once
    assert len(profiles) == ran > 0 and all(float(h) > 0 for _, h in profiles), out.stdout
    assert out.stdout.count("host ms/step: ") == ran
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [dict(zip(columns, (c.strip() for c in ln.strip().strip("|").split(" | "))))
            for ln in lines[1:] if ln.count(" | ") == len(columns) - 1]
    assert "Command: `" in out.stdout and "torch " in out.stdout
    return {(r["design"], r["variant"]): r for r in rows}


def number(cell: str) -> float:
    return float(cell.replace(",", "").rstrip("%"))


def test_smoke_reports_every_design_and_skips_what_cannot_run():
    rows = run_smoke()
    for design in "DXH":
        local = rows[(design, "local-fp32")]
        assert local["status"] == "ok", local
        assert number(local["tokens/s"]) > 0 and number(local["TFLOP/s"]) > 0, local
        assert abs(number(local["tokens/s"]) * number(local["step (ms)"]) / 1e3 - 512) <= 5, local
        for variant in ("te-bf16", "te-fp8"):
            status = rows[(design, variant)]["status"]
            if not HAS_TE:  # no Transformer Engine or no CUDA: the config refuses it
                assert status.startswith("skipped: ") and len(status) > len("skipped: ") + 10, status
            else:
                assert status == "ok" or status.startswith("skipped: "), status
    assert len(rows) == 9


def test_accumulated_micro_batches_count_in_a_step():
    """--accumulate 2: a step is two micro-batches of 2 x 256 tokens, so tokens/s x step time is
    1024 tokens (512 without it, in the test above's rows)."""
    rows = run_smoke("--designs", "d", "--variants", "local-fp32", "--accumulate", "2")
    r = rows[("D", "local-fp32")]
    assert r["status"] == "ok" and r["rows x micro-batches"] == "2 x 2", r
    tokens = number(r["tokens/s"]) * number(r["step (ms)"]) / 1e3
    assert abs(tokens - 2 * 2 * 256) <= 0.01 * 1024, r


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures MFU and peak memory on a GPU")
def test_smoke_on_a_gpu_reports_mfu_and_peak_memory():
    rows = run_smoke("--variants", "local-bf16,te-bf16", "--gpu", "h100")
    for design in "DXH":
        r = rows[(design, "local-bf16")]
        assert r["status"] == "ok" and number(r["MFU"]) > 0 and number(r["peak mem (GiB)"]) > 0, r


def _profile_module():
    """benchmarks/gpu_profile.py, imported from its path (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_profile", SCRIPT.parent / "gpu_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _waits_for_the_gpu():
    """Stands in for a synchronizing op: torch's sync debug mode warns with this message."""
    warnings.warn("called a synchronizing CUDA operation", stacklevel=1)


def test_host_syncs_counted_by_the_line_that_made_them():
    gp = _profile_module()
    with pytest.warns(UserWarning, match="an unrelated warning"):  # shown as before
        with gp.syncs_recorded(Counter()) as sites:
            for _ in range(3):
                _waits_for_the_gpu()
            warnings.warn("an unrelated warning", stacklevel=1)  # not a sync: not counted
    line = inspect.getsourcelines(_waits_for_the_gpu)[1] + 2
    assert list(sites.values()) == [3], sites
    inner, outer = next(iter(sites)).split(" < ")
    assert inner.endswith(f"test_gpu_step_bench.py:{line} _waits_for_the_gpu"), inner
    assert outer.endswith("test_host_syncs_counted_by_the_line_that_made_them"), outer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA synchronisations")
def test_host_syncs_find_an_item_on_a_gpu():
    gp = _profile_module()
    x = torch.ones(2, device="cuda")
    with gp.syncs_recorded(Counter()) as sites:
        x.sum().item()
    assert sum(sites.values()) == 1 and "test_host_syncs_find_an_item_on_a_gpu" in next(iter(sites))
