"""The `mmpretrain` command line: train, eval, data synth, convert, plan, slurm render."""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator

from mmpretrain.config import ConfigError
from mmpretrain.hf import VerificationError
from mmpretrain.train import DivergedError

USAGE_ERROR = 2
VERIFY_FAILED = 1


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, as for config errors
        self.exit(USAGE_ERROR, f"mmpretrain: error: {message}\n")


def _version() -> str:
    """The installed distribution's version."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mmpretrain")
    except PackageNotFoundError:
        return "(not installed)"


def build_parser() -> argparse.ArgumentParser:
    """Subcommands and their arguments."""
    p = _Parser(prog="mmpretrain", description="Pretrain NVLM-style vision-language models.")
    p.add_argument("--version", action="version", version=f"mmpretrain {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a job config (distributed under torchrun)")
    t.add_argument("config", help="YAML job config, e.g. jobs/tiny-d.yaml")
    t.add_argument("--run-dir", default=None, help="output directory (default runs/<config name>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.steps=10 (repeatable)")
    r = t.add_mutually_exclusive_group()
    r.add_argument("--resume", metavar="PATH", default=None,
                   help="start from this checkpoint (or run directory's latest) instead of the "
                        "run directory's own latest")
    r.add_argument("--no-resume", action="store_true",
                   help="start afresh; refuses a non-empty run directory unless --overwrite")
    t.add_argument("--overwrite", action="store_true",
                   help="with --no-resume: delete the run directory's contents first")
    t.add_argument("--init-from", metavar="PATH", default=None,
                   help="when the run directory has no checkpoint yet, start from the model weights "
                        "of this checkpoint (or run directory's latest) with a fresh optimizer, "
                        "schedule and data order; overrides checkpoint.init_from")

    e = sub.add_parser("eval", help="held-out loss of a run's latest checkpoint")
    e.add_argument("--run", required=True,
                   help="run directory (its latest checkpoint) or a checkpoint directory")
    e.add_argument("--samples", type=int, default=256, help="held-out samples to evaluate")

    d = sub.add_parser("data", help="datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    s = dsub.add_parser("synth", help="write the synthetic default dataset")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--samples", type=int, default=4000,
                   help="training samples (default 4000; held-out: 5%% of them, at least 64)")
    s.add_argument("--seed", type=int, default=0, help="seed (same seed, same dataset)")
    b = dsub.add_parser("build", help="convert JSONL / LLaVA / WebDataset / interleaved data to MDS shards")
    b.add_argument("--input", required=True, action="append", metavar="SPEC",
                   help="a .jsonl file, a .json array, a WebDataset .tar, or a directory of them")
    b.add_argument("--out", required=True, help="output directory (absent or empty)")
    b.add_argument("--workers", type=int, default=0, help="worker processes (default 0: inline)")
    b.add_argument("--shard-size", default="64MB",
                   help="largest shard file (default 64MB; smaller fits a smaller data.cache_limit)")
    b.add_argument("--heldout-every", type=int, default=0, metavar="K",
                   help="every K-th sample to OUT/heldout, the rest to OUT/train (default 0: all to OUT)")
    b.add_argument("--max-pixels", type=int, default=64 * 1024 * 1024,
                   help="skip images with more pixels (default 64 Mi)")
    k = dsub.add_parser("tokenizer", help="train a tokenizer on built datasets, or adopt a "
                                          "pretrained model's (data.path: OUT)")
    src = k.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", action="append", metavar="DIR",
                     help="a `data build` output or its train/ split (repeatable)")
    src.add_argument("--from", dest="pretrained", metavar="PATH",
                     help="a pretrained model's tokenizer.json (or its directory): its ids kept, "
                          "the special tokens it lacks added after them")
    k.add_argument("--out", required=True, help="directory for tokenizer.json")
    for role, verb, default in (("bos", "begins", "<s>"), ("eos", "ends", "</s>")):
        k.add_argument(f"--{role}", metavar="TOKEN",
                       help=f"with --from: the model's token every sample {verb} with (default: "
                            f"its tokenizer_config.json's {role}_token, else {default})")
    k.add_argument("--vocab-size", type=int, default=32000, help="BPE vocabulary (default 32000)")
    _add_convert(sub)
    _add_plan(sub)
    _add_slurm(sub)
    return p


def _add_convert(sub) -> None:
    """`convert to-hf | from-hf | verify`: Hugging Face export, import and verification."""
    c = sub.add_parser("convert", help="Hugging Face export, import and verification")
    csub = c.add_subparsers(dest="convert_command", required=True, parser_class=_Parser)
    tol = dict(type=float, default=1e-3, help="largest allowed max abs logit difference (default 1e-3)")
    tok = dict(default=None, help="tokenizer.json to use instead of the checkpoint's copy (older "
                                  "checkpoints: the one under data.path); same token ids only")
    t = csub.add_parser("to-hf", help="a checkpoint -> transformers LlavaForConditionalGeneration "
                                      "(D, native) or remote-code NVLM (X, H, tiles, merge=2)")
    t.add_argument("ckpt", help="checkpoint dir (runs/x/checkpoints/step_N) or run dir (its latest)")
    t.add_argument("out", help="output directory")
    t.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="weight dtype (default: the checkpoint's)")
    t.add_argument("--tokenizer", **tok)
    t.add_argument("--no-verify", action="store_true", help="skip comparing logits after the export")
    t.add_argument("--tol", **tol)
    f = csub.add_parser("from-hf", help="HF LLaVA / NVLM export / Llama / Mistral (+ Pixtral tower) "
                                        "-> a run dir that `mmpretrain train` starts from")
    f.add_argument("hf_dir", help="HF model directory (LLaVA with a Pixtral tower, an NVLM export, "
                                  "or a causal LM)")
    f.add_argument("out", help="output run directory (gets checkpoints/step_00000000 and latest)")
    f.add_argument("--config", required=True, help="the job config the weights must fit")
    f.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    f.add_argument("--vision-tower", default=None, help="HF Pixtral vision model (or LLaVA) directory")
    f.add_argument("--trust-pickle", action="store_true",
                   help="allow pickle .bin weights (loading a pickle can run arbitrary code)")
    v = csub.add_parser("verify", help="compare the logits of a checkpoint and its HF export")
    v.add_argument("ckpt", help="checkpoint dir or run dir")
    v.add_argument("hf_dir", help="HF model directory")
    v.add_argument("--tokenizer", **tok)
    v.add_argument("--tol", **tol)


def _add_plan(sub) -> None:
    """`plan CONFIG --nodes N`: memory, FLOPs and step time of a job config on a cluster."""
    p = sub.add_parser("plan", help="parameters, memory per GPU, FLOPs and step time of a config "
                                    "on N nodes (exit 1 when it does not fit)")
    p.add_argument("config", help="YAML job config")
    p.add_argument("--nodes", type=int, required=True, help="nodes")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    p.add_argument("--gpu", default="h100", choices=["h100", "h200", "a100", "b200"],
                   help="GPU kind (default h100)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="model-FLOPs utilisation of a busy GPU assumed for the step time (default 0.4)")
    p.add_argument("--image-fraction", type=float, default=1.0,
                   help="share of decoder positions that are image tokens (default 1: the worst case)")
    p.add_argument("--spec", choices=["te", "local"], default=None,
                   help="kernels: te (Transformer Engine, flash attention; GPUs) or local "
                        "(megatron-core's portable spec, dense attention scores); default: the "
                        "config's model.spec, with auto taken as te")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--suggest", type=int, default=3, metavar="K",
                   help="when it does not fit, list the K fastest layouts that do (default 3)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def _add_slurm(sub) -> None:
    """`slurm render CONFIG --nodes N`: an sbatch script for the config."""
    s = sub.add_parser("slurm", help="Slurm job scripts")
    ssub = s.add_subparsers(dest="slurm_command", required=True, parser_class=_Parser)
    r = ssub.add_parser("render", help="write an sbatch script for a config (layout checked first)")
    r.add_argument("config", help="YAML job config")
    r.add_argument("--nodes", type=int, required=True, help="nodes")
    r.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (= tasks) per node (default 8)")
    r.add_argument("--partition", default=None, help="Slurm partition")
    r.add_argument("--account", default=None, help="Slurm account")
    r.add_argument("--time", default="04:00:00",
                   help="time limit, as sbatch takes it (UNLIMITED: none; default 04:00:00)")
    r.add_argument("--signal-seconds", type=int, default=600,
                   help="send USR1 (checkpoint, stop, requeue) this long before the limit (default 600)")
    r.add_argument("--container", default=None, help="container image (pyxis/enroot srun flags)")
    r.add_argument("--mounts", action="append", default=[], metavar="SRC:DST[,SRC:DST]",
                   help="container mounts (repeatable)")
    r.add_argument("--run-dir", default=None, help="run directory (default runs/<config name>)")
    r.add_argument("--python", default=None,
                   help="python on the nodes (default: this interpreter; 'python' in a container)")
    r.add_argument("--job-name", default=None, help="job name (default mmp-<config name>)")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field in the job (repeatable)")
    r.add_argument("-o", "--output", default=None,
                   help="write the script to this file instead of stdout")


def _train_inputs(args):
    """(config, run directory) of `train`, checked before the slow imports."""
    from pathlib import Path

    from mmpretrain.config import check_trainable, load

    cfg = load(args.config, args.set)
    if args.init_from is not None:
        cfg.checkpoint.init_from = args.init_from
    check_trainable(cfg)
    if args.overwrite and not args.no_resume:
        raise ValueError("--overwrite: only with --no-resume (a rerun resumes from the run "
                         "directory's latest checkpoint)")
    run_dir = args.run_dir or str(Path("runs") / Path(args.config).stem)
    if Path(run_dir).exists() and not Path(run_dir).is_dir():
        raise ValueError(f"--run-dir {run_dir}: is a file, not a directory")
    return cfg, run_dir


def _train(args) -> None:
    from mmpretrain.train.preempt import PreemptionHandler

    preempt = PreemptionHandler().install()  # a stop asked during start-up is kept for the loop
    try:
        cfg, run_dir = _train_inputs(args)
        from mmpretrain.train.loop import train

        train(cfg, run_dir, resume=args.resume, fresh=args.no_resume, overwrite=args.overwrite,
              preempt=preempt)
    finally:
        preempt.uninstall()


def _eval(args) -> None:
    from mmpretrain.evaluate import main as eval_main

    if args.samples <= 0:
        raise ValueError(f"--samples: must be positive, got {args.samples}")

    eval_main(args.run, args.samples)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _stop_on_term() -> Iterator[None]:
    """SIGTERM (a time limit, `timeout`, `docker stop`) ends this command as Ctrl-C does; the
    process's own handler is back afterwards."""
    import signal

    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _data(args) -> None:
    if args.data_command == "build":
        import json

        from mmpretrain.data.build import build
        from mmpretrain.data.cache import parse_size

        size = parse_size(args.shard_size, "--shard-size")
        if not 0 < size < 1 << 32:
            raise ValueError(f"--shard-size {args.shard_size}: between 1 byte and 4 GiB (MDS "
                             "offsets are 32-bit)")
        with _stop_on_term():  # a time limit's SIGTERM cleans up as Ctrl-C does: no partial output
            summary = build(args.input, args.out, args.workers, args.max_pixels, size,
                            heldout_every=args.heldout_every)
        print(json.dumps(summary))
    elif args.data_command == "tokenizer":
        import json

        from mmpretrain.data.build import adopt, build_tokenizer

        if args.pretrained:
            print(json.dumps(adopt(args.pretrained, args.out, args.bos, args.eos)))
        elif args.bos or args.eos:
            raise ValueError("--bos/--eos name a pretrained model's tokens: they go with --from")
        else:
            print(json.dumps(build_tokenizer(args.input, args.out, args.vocab_size)))
    else:
        _synth(args)


def _synth(args) -> None:
    from mmpretrain.data.synth import synthesize

    if args.samples <= 0:
        raise ConfigError(f"--samples must be positive, got {args.samples}")
    meta = synthesize(args.out, samples=args.samples, seed=args.seed)
    print(f"dataset ready in {args.out}: {meta}")


def _convert(args) -> None:
    if args.convert_command == "to-hf":
        from mmpretrain.hf.export import export

        export(args.ckpt, args.out, args.shard_size, args.dtype, args.tokenizer,
               None if args.no_verify else args.tol)
    elif args.convert_command == "from-hf":
        from mmpretrain.config import load

        cfg = load(args.config, args.set)
        from mmpretrain.hf.import_ import import_hf

        import_hf(args.hf_dir, args.out, cfg, args.vision_tower, args.trust_pickle)
    else:
        from mmpretrain.hf.verify import verify

        verify(args.ckpt, args.hf_dir, args.tol, args.tokenizer)


def _plan(args) -> int:
    import json

    from mmpretrain import planner
    from mmpretrain.config import load
    from mmpretrain.planner import report, suggest

    cfg = load(args.config, args.set)
    spec = args.spec or ("local" if cfg.model.spec == "local" else "te")
    kw = dict(gpus_per_node=args.gpus_per_node, gpu=args.gpu, mfu=args.mfu,
              image_fraction=args.image_fraction, spec=spec)
    vocab = planner.vocab_size_of(cfg)
    plan_of = lambda c: planner.plan_job(c, args.nodes, vocab_size=vocab,  # noqa: E731
                                         validate=False, **kw)
    try:
        plan = planner.plan_job(cfg, args.nodes, vocab_size=vocab, **kw)
    except ConfigError as e:  # the config's layout may not run on this many GPUs
        if args.json or not args.suggest or not _layout_refuses(cfg, args):
            raise
        print(f"the config's layout does not run on {args.nodes * args.gpus_per_node} GPUs: {e}")
        _suggest(cfg, args, plan_of)
        return 1
    if args.json:
        print(json.dumps(report.as_dict(plan)))
        return 0 if plan.fits else 1
    print(report.text(plan, cfg, args.config, args.nodes, args.gpus_per_node))
    if hint := suggest.balance_hint(cfg, plan, plan_of):
        print(hint)
    if not plan.fits and args.suggest:
        _suggest(cfg, args, plan_of)
    return 0 if plan.fits else 1


def _suggest(cfg, args, plan_of) -> None:
    """Print the fastest `--suggest` layouts of the command line's GPUs that fit."""
    from mmpretrain.planner import report, suggest

    world = args.nodes * args.gpus_per_node
    found = suggest.suggest(cfg, world, args.gpus_per_node, plan_of, args.suggest)
    print(report.suggestions(found, world, bool(found) or suggest.runnable(cfg, world,
                                                                        args.gpus_per_node)))


def _layout_refuses(cfg, args) -> bool:
    """Whether the layout checks refuse `cfg` on the command line's GPUs (not another error)."""
    from mmpretrain.planner.layout import check

    try:
        check(cfg, args.nodes * args.gpus_per_node)
    except ConfigError:
        return args.nodes >= 1 and args.gpus_per_node >= 1
    return False


def _slurm(args) -> None:
    from pathlib import Path

    from mmpretrain.slurm import JobSpec, log_dir, render

    spec = JobSpec(args.config, args.nodes, args.gpus_per_node, args.run_dir, args.time,
                   args.partition, args.account, args.container, args.mounts, args.python,
                   args.job_name, args.set, args.signal_seconds, output=args.output)
    text = render(spec)
    if args.output:
        try:
            Path(args.output).write_text(text)
        except OSError as e:
            raise ValueError(f"-o {args.output}: cannot write it ({e.strerror})") from None
    log_dir(text).mkdir(parents=True, exist_ok=True)  # Slurm opens the log before the script runs
    if not args.output:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script and `python -m mmpretrain`."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # megatron-core imports torch's extension builder, which guesses a CUDA_HOME on CPU machines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # megatron-core warns at import about each missing optional kernel library (TE, apex).
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    # Deprecations inside megatron's checkpoint loading (torch.distributed.checkpoint's API it calls):
    for message in (r"`load_state_dict` is deprecated", r".*deprecating ShardedTensor"):
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    args = build_parser().parse_args(argv)
    handler = {"train": _train, "eval": _eval, "data": _data, "convert": _convert,
               "plan": _plan, "slurm": _slurm}[args.command]
    try:
        status = handler(args)
    except (ConfigError, OSError, ValueError) as e:  # a bad input, a path that is not usable
        print(f"mmpretrain: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except VerificationError as e:
        print(f"mmpretrain: verification failed: {e}", file=sys.stderr)
        return VERIFY_FAILED
    except DivergedError as e:
        print(f"mmpretrain: training stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: a run resumes from its latest checkpoint
        print(f"mmpretrain: {args.command} interrupted", file=sys.stderr)
        return 130
    return status or 0
