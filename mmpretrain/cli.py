"""The `mmpretrain` command line: train, eval, data synth."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from mmpretrain.config import ConfigError

USAGE_ERROR = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for config errors
        self.exit(USAGE_ERROR, f"mmpretrain: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Subcommands and their arguments."""
    p = _Parser(prog="mmpretrain", description="Pretrain NVLM-style vision-language models.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a job config (distributed under torchrun)")
    t.add_argument("config", help="YAML job config, e.g. jobs/tiny-d.yaml")
    t.add_argument("--run-dir", default=None, help="output directory (default runs/<config name>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=10 (repeatable)")

    e = sub.add_parser("eval", help="held-out loss of a run's latest checkpoint")
    e.add_argument("--run", required=True, help="run directory")
    e.add_argument("--samples", type=int, default=256, help="held-out samples to evaluate")

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    s = dsub.add_parser("synth", help="write the synthetic default dataset")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--samples", type=int, default=4000, help="training samples")
    s.add_argument("--seed", type=int, default=0, help="seed (same seed, same dataset)")
    return p


def _train(args) -> None:
    from pathlib import Path

    from mmpretrain.config import load

    cfg = load(args.config, args.set)  # config errors surface before the slow imports
    from mmpretrain.train.loop import train

    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    train(cfg, run_dir)


def _eval(args) -> None:
    from mmpretrain.evaluate import main as eval_main

    eval_main(args.run, args.samples)


def _synth(args) -> None:
    from mmpretrain.data.synth import synthesize

    if args.samples <= 0:
        raise ConfigError(f"--samples must be positive, got {args.samples}")
    meta = synthesize(args.out, samples=args.samples, seed=args.seed)
    print(f"dataset ready in {args.out}: {meta}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m mmpretrain`."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # megatron-core warns at import about each missing optional kernel library (TE, apex).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    args = build_parser().parse_args(argv)
    handler = {"train": _train, "eval": _eval, "data": _synth}[args.command]
    try:
        handler(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"mmpretrain: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    return 0
