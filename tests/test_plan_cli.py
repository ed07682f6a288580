"""`mmpretrain plan` from the command line: the report, its exit status, the layouts it suggests
when one does not fit (each loads and fits as printed), and the kernels it plans for."""
import json
import re
from pathlib import Path

from mmpretrain import planner
from mmpretrain.config import load

ROOT = Path(__file__).resolve().parent.parent


def test_plan_command(capsys):
    from mmpretrain.cli import main

    assert main(["plan", "jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "4"]) == 0
    out = capsys.readouterr().out
    assert "FITS" in out and "tokens/s" in out and "bubble" in out
    assert main(["plan", "jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "4", "--set", "parallel.tp=1",
                 "--set", "parallel.sequence_parallel=false"]) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "layouts that fit" in out and "--set parallel.tp=" in out
    # a layout that cannot run on the GPUs asked about: the reason, then the layouts that can
    assert main(["plan", "jobs/nvlm-d-72b-pretrain.yaml", "--nodes", "2"]) == 1
    out = capsys.readouterr().out
    assert "the config's layout does not run on 16 GPUs: world size 16 is not divisible" in out
    assert "layouts that fit" in out or "no tp/pp/vpp/recompute layout fits" in out
    # 32 layers and a global batch of 256 on 3 nodes: pipelines of 3 stages, the first shorter
    assert main(["plan", "jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "3"]) == 1
    out = capsys.readouterr().out
    assert "layouts that fit" in out and "--set parallel.pp=3" in out, out
    first = int(re.search(r"parallel.first_stage_decoder_layers=(\d+)", out).group(1))
    assert (32 - first) % 2 == 0 and 1 <= first < 32
    line = next(ln for ln in out.splitlines() if "--set parallel.pp=3" in ln)
    cfg = load(ROOT / "jobs/nvlm-d-8b-pretrain.yaml", line.split("s/step: --set ", 1)[1].split(" --set "))
    assert planner.plan_job(cfg, 24).fits  # loads, passes the layout checks and fits as printed
    assert main(["plan", "jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "37", "--gpus-per-node", "1"]) == 1
    assert "no tp/pp/vpp layout of 37 GPUs passes the layout checks" in capsys.readouterr().out
    assert main(["plan", "jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "3", "--json"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert main(["plan", "jobs/nvlm-d-72b-pretrain.yaml", "--nodes", "32", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and len(data["stages"]) == 4 and data["tokens_per_second"] > 0


def test_suggested_layouts_load_and_fit_as_printed(capsys):
    """Each suggested --set line, applied to the config, passes the config and layout checks and
    fits; the user's uneven first stage is replaced: by an even split, or by a balanced one that
    is faster than the even split."""
    from mmpretrain.cli import main

    base = ["jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "4", "--set", "parallel.tp=1",
            "--set", "parallel.sequence_parallel=false", "--set", "parallel.pp=2",
            "--set", "parallel.first_stage_decoder_layers=20"]
    assert main(["plan", *base, "--suggest", "6"]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "s/step: --set" in ln]
    assert len(lines) == 6
    for line in lines:
        sets = line.split("s/step: --set ", 1)[1].split(" --set ")
        first = [s for s in sets if s.startswith("parallel.first_stage_decoder_layers=")]
        assert len(first) == 1 and first[0] != "parallel.first_stage_decoder_layers=20"
        cfg = load(ROOT / base[0], [s for s in base[4::2]] + sets)
        plan = planner.plan_job(cfg, 4)
        assert plan.fits and f"{plan.step_seconds:7.2f} s/step" in line
        if not first[0].endswith("=null"):
            even = load(ROOT / base[0], [s for s in base[4::2]] + sets
                        + ["parallel.first_stage_decoder_layers=null"])
            assert planner.plan_job(even, 4).step_seconds > plan.step_seconds


def test_suggestions_find_a_layout_as_fast_as_a_shipped_one(capsys):
    """Forced off its layout (pp=1 does not fit), the 72B job is offered layouts at least as fast
    as the one it ships with (pipelined, first stage shortened for the vision encoder)."""
    from mmpretrain.cli import main

    job = ["jobs/nvlm-d-72b-pretrain.yaml", "--nodes", "4"]
    shipped = planner.plan_job(load(ROOT / job[0]), 4)
    assert shipped.fits and load(ROOT / job[0]).parallel.first_stage_decoder_layers
    assert main(["plan", *job, "--set", "parallel.pp=1", "--set", "parallel.vpp=null",
                 "--set", "parallel.first_stage_decoder_layers=null"]) == 1
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "s/step: --set" in ln]
    fastest = float(lines[0].split("GiB,")[1].split("s/step")[0])
    assert fastest <= round(shipped.step_seconds, 2)
    assert "parallel.pp=1" not in lines[0] and "first_stage_decoder_layers=null" not in lines[0]


def test_plan_kernels_default_to_the_configs_spec(capsys):
    from mmpretrain.cli import main

    def plan(*args):
        main(["plan", "jobs/nvlm-d-8b-pretrain.yaml", "--nodes", "4", "--json", *args])
        return json.loads(capsys.readouterr().out)

    local = plan("--set", "model.spec=local", "--set", "train.fp8=null")
    assert local == plan("--spec", "local", "--set", "train.fp8=null")
    assert local["peak_bytes"] != plan("--spec", "te", "--set", "train.fp8=null")["peak_bytes"]
    assert plan() == plan("--spec", "te")  # auto plans for the GPUs: TE
