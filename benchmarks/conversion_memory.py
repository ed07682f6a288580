"""Peak host memory of `convert to-hf` and `convert from-hf` against the model's size. On CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/conversion_memory.py [--layers 16 --hidden 1024]

Saves a checkpoint of a freshly initialised tiny-d model whose decoder is --layers x --hidden
(fp32), then runs, each in a process of its own (its peak resident memory above what it held
after the imports: Linux's VmHWM, reset once they are done):
    start   the imports and the model on the meta device: what any export costs before weights
    whole   the model loaded whole, as verification holds it (and as the export did before it
            read the checkpoint a shard at a time)
    export  `convert to-hf --no-verify --shard-size S`
    import  `convert from-hf` of that export into a new run (the job config the checkpoint holds)
and prints the model's bytes, each peak, and each peak above `start` as a fraction of the model.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 2 ** 20

# The imports every case needs, then the peak reset (Linux: `clear_refs` 5 resets VmHWM).
PRE = """
import transformers, safetensors.torch
from transformers import LlavaConfig, PixtralProcessor
from mmpretrain.cli import main
from mmpretrain.hf import export, local
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS:")
"""
POST = "print('PEAK', status('VmHWM:') - base)"
START = """
ckpt = local.resolve_checkpoint({run!r}); cfg = local.checkpoint_config(ckpt)
model = local.meta_model(ckpt, cfg, local.open_tokenizer(cfg, None, ckpt))
"""
WHOLE = """
ckpt = local.resolve_checkpoint({run!r}); cfg = local.checkpoint_config(ckpt)
model = local.load_cpu_model(ckpt, cfg, local.open_tokenizer(cfg, None, ckpt))
"""
EXPORT = """
assert main(["convert", "to-hf", {run!r}, {out!r}, "--no-verify", "--shard-size", {shard!r}]) == 0
"""
IMPORT = """
assert main(["convert", "from-hf", {out!r}, {back!r}, "--config", {run!r} + "/config.yaml"]) == 0
"""


def make_checkpoint(root: Path, layers: int, hidden: int) -> tuple[Path, int]:
    """A run directory with a weights-only checkpoint; returns it and the model's fp32 bytes."""
    from mmpretrain.data.tokenizer import TextTokenizer
    from mmpretrain.parallel import cuda_to_cpu

    from mmpretrain import checkpoint
    from mmpretrain.config import dump, load
    from mmpretrain.hf import local

    data = root / "data"
    data.mkdir()
    tok = TextTokenizer.train([f"sample {i} of a small text corpus" for i in range(200)], 300)
    tok.save(data / "tokenizer.json")
    cfg = load(ROOT / "jobs/tiny-d.yaml", [
        f"data.path={data}", f"decoder.num_layers={layers}", f"decoder.hidden_size={hidden}",
        f"decoder.ffn_hidden_size={4 * hidden}", f"decoder.num_attention_heads={hidden // 64}",
        f"decoder.num_query_groups={hidden // 128}", "train.precision=fp32"])
    model = local.build_cpu_model(local.single_process(cfg), tok)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    with cuda_to_cpu():
        checkpoint.save_weights(root / "run", 0, model, cfg, "random")
    dump(cfg, root / "run" / "config.yaml")
    return root / "run", size


def peak(script: str) -> int:
    """Peak resident bytes a fresh python process adds running `script` after the imports."""
    r = subprocess.run([sys.executable, "-c", PRE + script + POST], cwd=ROOT, capture_output=True,
                       text=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                       "CUDA_VISIBLE_DEVICES": ""})
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return int(next(line for line in r.stdout.splitlines() if line.startswith("PEAK")).split()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--shard-size", default="100MB")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run, size = make_checkpoint(Path(tmp), args.layers, args.hidden)
        kw = dict(run=str(run), out=str(Path(tmp) / "hf"), back=str(Path(tmp) / "back"),
                  shard=args.shard_size)
        peaks = {name: peak(script.format(**kw)) for name, script in  # the import reads the export
                 (("start", START), ("whole", WHOLE), ("export", EXPORT), ("import", IMPORT))}
    print(f"model: {size / MiB:.0f} MiB fp32 ({args.layers} x {args.hidden} decoder); "
          f"export shards of {args.shard_size}")
    for name, value in peaks.items():
        above = value - peaks["start"]
        print(f"{name:7s} peak {value / MiB:7.0f} MiB above the imports, {above / MiB:7.0f} MiB "
              f"above start = {above / size:.2f} x the model")
    print(json.dumps({"model_bytes": size, **{f"{k}_peak_bytes": v for k, v in peaks.items()}}))


if __name__ == "__main__":
    main()
