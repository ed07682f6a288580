"""`mmpretrain convert to-hf CKPT OUT`: a dist checkpoint -> a transformers model directory.

The checkpoint (saved under any TP/PP/DP layout) is read in one process at TP=1/PP=1 and never
whole: a model on the meta device names each tensor's shape and checkpoint key, and each output
shard's tensors are read (`checkpoint.CheckpointSlices`, fp32), converted group by group and written,
so memory peaks near one output shard in fp32 plus its copy in the export's dtype. Verifying
then loads the whole model beside the HF one.

The embedding and output layer keep their padded rows (a multiple of 128, see
`model/build.padded_vocab_size`): `text_config.vocab_size` is the padded size, so the logits
match ours column for column and a round trip is exact; the generation config suppresses the
padding ids, which the tokenizer does not have.

D at native resolution becomes LlavaForConditionalGeneration; X, H, tiled D and pixel-shuffled D
become the remote-code NVLMForConditionalGeneration, whose configuration and modeling files are
copied into the export (`remote.py`). `configs.check_exportable` is where that choice is made.

OUT is written as a whole: the files go into a temporary sibling directory, which replaces OUT
once complete, so a crash leaves the previous export intact and no file of it survives the new
one. OUT must be absent, empty or a previous export of this program (it has mmpretrain.json);
anything else (a model downloaded from the Hub, say) is refused before the checkpoint loads.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpretrain import checkpoint
from mmpretrain.config import Config
from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.configs import check_exportable, llava_config
from mmpretrain.hf.mapping import Dims, Group, check_covers, llava_groups, model_tensors
from mmpretrain.hf.processor import write_text_files
from mmpretrain.hf.remote import nvlm_config, nvlm_groups, write_code
from mmpretrain.hf.shards import parse_size, plan_shards, save_shard, shard_name, write_index

log = logging.getLogger("mmpretrain")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Format:
    """An export format: its tensor groups, its transformers config and, for remote code, what
    writes its code files into the export."""

    groups: Callable[[Config], list[Group]]
    config: Callable[..., object]  # (cfg, padded vocab size, tokenizer, dtype name) -> config
    code: Callable[[Path], None] | None = None


FORMATS = {"llava": Format(lambda cfg: llava_groups(Dims.of(cfg)), llava_config),
           "nvlm": Format(nvlm_groups, nvlm_config, write_code)}


def group_bytes(group: Group, sources: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    """Bytes the group's HF tensors take in `dtype` (computed on meta tensors, no copies)."""
    meta = [torch.empty(sources[n].shape, device="meta") for n in group.ours]
    return sum(t.numel() for t in group.to_hf(*meta)) * dtype.itemsize


def convert_group(group: Group, sources: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """The HF tensors of one group; its source tensors are released from `sources`."""
    outputs = group.to_hf(*(sources.pop(n) for n in group.ours))
    return {name: t.to("cpu", dtype).contiguous() for name, t in zip(group.hf, outputs)}


def write_weights(out: Path, groups: list[Group], shapes: dict[str, torch.Tensor],
                  read: Callable[[list[str]], dict[str, torch.Tensor]], dtype: torch.dtype,
                  shard_bytes: int) -> int:
    """Write all groups as safetensors shards plus the index; return the number of shards.
    `shapes`: our tensors (meta tensors will do); `read(names)`: those tensors' values."""
    from tqdm import tqdm

    sizes = [group_bytes(g, shapes, dtype) for g in groups]
    plan = plan_shards(sizes, shard_bytes)
    weight_map: dict[str, str] = {}
    with tqdm(total=len(groups), desc="to-hf", unit="group") as bar:
        for i, members in enumerate(plan):
            name, tensors = shard_name(i, len(plan)), {}
            sources = read([n for k in members for n in groups[k].ours])
            for k in members:
                tensors.update(convert_group(groups[k], sources, dtype))
                bar.set_postfix_str(groups[k].label, refresh=False)
                bar.update()
            save_shard(out / name, tensors)
            weight_map.update(dict.fromkeys(tensors, name))
            del tensors
    write_index(out, weight_map, sum(sizes))
    return len(plan)


def check_out(out: Path) -> None:
    """OUT is absent, an empty directory or a previous export (mmpretrain.json); else a
    ConversionError (a file, a path under a file, a directory of other files)."""
    local.check_not_under_file(out)
    if out.is_dir() and any(out.iterdir()) and not (out / "mmpretrain.json").is_file():
        raise ConversionError(f"{out} holds other files, not a previous export (no mmpretrain.json)"
                              f"; to-hf replaces an export whole: pick an empty or new directory")


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def clear_stale(out: Path) -> None:
    """What an export killed on this machine left beside OUT: its half-written `.OUT.tmp-PID`
    (deleted) and, if it died between the two renames of `replace_dir`, the previous export moved
    aside as `.OUT.old-PID` (put back when OUT is missing, else deleted)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)")
    for path in sorted(out.parent.glob(f".{out.name}.*-*")):
        m = pattern.fullmatch(path.name)
        if not m or _running(int(m.group(2))):
            continue
        if m.group(1) == "old" and not out.exists():
            log.warning("to-hf: restoring %s from %s (an export died replacing it)", out, path)
            os.replace(path, out)
            continue
        log.warning("to-hf: deleting %s, left by an export that did not finish", path)
        shutil.rmtree(path, ignore_errors=True)


def replace_dir(tmp: Path, out: Path) -> None:
    """Put the complete directory `tmp` at `out`, removing what `out` held."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def write_export(out: Path, cfg: Config, fmt: Format, model, tok, out_dtype: torch.dtype,
                 shard_bytes: int, ckpt: Path) -> int:
    """Every file of the export into the directory `out`, the weights read from `ckpt` a shard at
    a time for `model` (on the meta device); return the number of shards."""
    groups = fmt.groups(cfg)
    shapes, request = model_tensors(model.state_dict()), model.sharded_state_dict()
    check_covers(groups, shapes)
    checkpoint.check_files(ckpt)
    checkpoint.check_shapes(ckpt, request)  # the clearer messages (a padded vocabulary's)
    slices = checkpoint.CheckpointSlices(ckpt)
    slices.check({k: request[k] for k in shapes})  # every tensor, before anything is written
    vocab_size = shapes["language_model.embedding.word_embeddings.weight"].shape[0]
    n = write_weights(out, groups, shapes, lambda names: slices.read({k: request[k] for k in names}),
                      out_dtype, shard_bytes)
    fmt.config(cfg, vocab_size, tok, DTYPE_NAMES[out_dtype]).save_pretrained(out)
    if fmt.code is not None:
        fmt.code(out)
    write_text_files(out, cfg, tok, vocab_size, check_exportable(cfg))
    (out / "mmpretrain.json").write_text(json.dumps(
        {"checkpoint": str(ckpt.resolve()), "design": cfg.model.design,
         "format": check_exportable(cfg)}) + "\n")
    return n


def export(ckpt: str | Path, out: str | Path, shard_size: str = "5GB", dtype: str | None = None,
           tokenizer: str | Path | None = None, tol: float | None = None) -> Path:
    """Write the checkpoint as a transformers model directory; return the checkpoint used. With
    `tol`, the new export is verified (`verify.verify_model`) before it replaces what OUT held:
    one that fails leaves OUT as it was."""
    path = local.resolve_checkpoint(ckpt)
    out = Path(out).resolve()
    check_out(out)
    cfg = local.checkpoint_config(path)
    fmt = FORMATS[check_exportable(cfg)]
    shard_bytes = parse_size(shard_size)
    tok = local.open_tokenizer(cfg, tokenizer, path)
    out_dtype = DTYPES[dtype] if dtype else local.checkpoint_dtype(path)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:  # before the checkpoint loads: a place that cannot be written fails now
        out.parent.mkdir(parents=True, exist_ok=True)
        clear_stale(out)
        shutil.rmtree(tmp, ignore_errors=True)  # this PID's own, from an earlier process
        tmp.mkdir()
    except OSError as e:
        raise ConversionError(f"{out}: cannot write there ({e.strerror})") from None
    try:
        log.info("to-hf: reading %s a shard at a time", path)
        n = write_export(tmp, cfg, fmt, local.meta_model(path, cfg, tok), tok, out_dtype,
                         shard_bytes, path)
        if tol is not None:
            from mmpretrain.hf.verify import verify_model

            log.info("to-hf: loading %s to verify the export", path)
            verify_model(local.load_cpu_model(path, cfg, tok), cfg, tok, tmp, tol)
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("to-hf: wrote %s (%d shard%s, %s)", out, n, "s" * (n > 1), DTYPE_NAMES[out_dtype])
    return path
