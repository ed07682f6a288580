"""`mmpretrain data build`: users' JSONL / WebDataset / interleaved data -> MDS shards.

Records are converted and checked (every image decoded once, its size checked) in worker
processes and written in input order, so the same inputs give the same shards whatever the number
of workers. A bad record is skipped and counted by reason, never aborts the build. The summary
(written, skipped by reason with a few examples, bytes, time) is printed and saved as
<out>/build_summary.json.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections import Counter
from functools import partial
from itertools import chain
from pathlib import Path

from mmpretrain.data.decode import DEFAULT_MAX_PIXELS, ImageError, PillowDecoder, decode_image
from mmpretrain.data.formats import RawRecord, RecordError, check_input, input_files, read_input, to_sample
from mmpretrain.data.sequence import SampleError, check_text
from mmpretrain.data.shards import COLUMNS, DEFAULT_SIZE_LIMIT, to_row
from mmpretrain.data.workers import ordered_map
from streaming import MDSWriter

log = logging.getLogger("mmpretrain")
SUMMARY = "build_summary.json"
SKIPS = "skipped.jsonl"  # every skipped record: reason and message
PROGRESS_S = 10.0  # seconds between the progress lines of `data tokenizer`
IMAGE_REASONS = {"image_too_large": "oversize_image", "empty_image": "undecodable_image",
                 "corrupt_image": "undecodable_image"}
EXAMPLES = 5  # skip messages kept per reason


def check_sample(sample: dict, max_pixels: int) -> None:
    """RecordError when a text is not valid Unicode or an image does not decode / is too large."""
    for seg in sample["segments"]:
        if "text" in seg:
            try:
                check_text(seg["text"])
            except SampleError as e:
                raise RecordError("bad_record", str(e)) from None
    for k, blob in enumerate(sample["images"]):
        try:
            decode_image(blob, PillowDecoder(), max_pixels)
        except ImageError as e:
            raise RecordError(IMAGE_REASONS[e.reason], f"image {k}: {e}") from None


def convert(item: tuple[int, RawRecord], max_pixels: int = DEFAULT_MAX_PIXELS):
    """(index, raw record) -> ("ok", row) or ("skip", reason, message)."""
    index, rec = item
    try:
        sample = to_sample(rec, index)
        check_sample(sample, max_pixels)
        return "ok", to_row(sample)
    except RecordError as e:
        return "skip", e.reason, f"{rec.where}: {e}"
    except Exception as e:  # a record of an unforeseen shape: skipped and shown, never fatal
        return "skip", "bad_record", f"{rec.where}: {type(e).__name__}: {e}"


class Progress:
    """Counts, and a line on stderr every `every` seconds."""

    def __init__(self, enabled: bool, every: float = 2.0, skips: Path | None = None):
        self.enabled, self.every, self.t0, self.last = enabled, every, time.time(), 0.0
        self.written, self.skipped, self.examples = 0, Counter(), {}
        self.skips, self.skips_file = skips, None  # every skip, one JSON line each (made on the first)

    def skip(self, reason: str, message: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < EXAMPLES:
            self.examples[reason].append(message)
        if self.skips is not None:
            if self.skips_file is None:
                self.skips_file = open(self.skips, "w")  # noqa: SIM115 - closed by close()
            self.skips_file.write(json.dumps({"reason": reason, "message": message}) + "\n")

    def close(self) -> None:
        if self.skips_file is not None:
            self.skips_file.close()

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if self.enabled and (force or now - self.last >= self.every):
            self.last = now
            print(f"build: {self.written + sum(self.skipped.values())} records, {self.written} "
                  f"written, {sum(self.skipped.values())} skipped ({now - self.t0:.1f} s)",
                  file=sys.stderr, flush=True)


def _undo(out: Path, existed: bool) -> None:
    """Remove what a failed build wrote: `out` itself unless it `existed` (empty) before."""
    if not existed:
        shutil.rmtree(out, ignore_errors=True)
        return
    for p in list(out.iterdir()) if out.is_dir() else []:
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--out {out}: exists and is not an empty directory")


def build(inputs: list[str], out: str | Path, workers: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
          size_limit: int = DEFAULT_SIZE_LIMIT, progress: bool = True, heldout_every: int = 0) -> dict:
    """Convert `inputs` into MDS shards in `out`; return (and save) the summary. With
    `heldout_every` k, every k-th written sample goes to `out`/heldout and the others to
    `out`/train (the layout `data.path` reads), else all of them to `out`."""
    out = Path(out)
    _check_out(out)
    if heldout_every < 0 or heldout_every == 1:
        raise ValueError(f"--heldout-every {heldout_every}: must be 0 (no held-out split) or at "
                         f"least 2 (1 would leave train/ empty)")
    if workers < 0:
        raise ValueError(f"--workers {workers}: must be 0 (inline) or positive")
    if max_pixels <= 0:
        raise ValueError(f"--max-pixels {max_pixels}: must be positive")
    existed = out.exists()
    for spec in inputs:  # every input readable before the output directory is made
        for path in input_files(spec):
            check_input(path)
    records = enumerate(chain.from_iterable(read_input(s) for s in inputs))
    out.mkdir(parents=True, exist_ok=True)
    prog = Progress(progress, skips=out / SKIPS)
    splits = ("train", "heldout") if heldout_every else ("",)
    writers = {s: MDSWriter(out=str(out / s), columns=COLUMNS, size_limit=size_limit) for s in splits}
    counts = Counter()
    try:
        for result in ordered_map(partial(convert, max_pixels=max_pixels), records, workers):
            if result[0] == "ok":
                split = splits[-1] if heldout_every and (prog.written + 1) % heldout_every == 0 \
                    else splits[0]
                writers[split].write(result[1])
                counts[split] += 1
                prog.written += 1
            else:
                prog.skip(result[1], result[2])
            prog.tick()
        if not prog.written:
            raise ValueError(f"--input {', '.join(inputs)}: no sample written, every record "
                             f"skipped ({dict(sorted(prog.skipped.items())) or 'no records'}; "
                             f"examples: {prog.examples})")
    except BaseException:
        prog.close()
        for writer in writers.values():
            writer.cancel_future_jobs()  # no index.json: a failed build is not a dataset
        _undo(out, existed)  # it was absent or empty: leave it so
        raise
    prog.close()
    for writer in writers.values():
        writer.finish()
    prog.tick(force=True)
    summary = {"written": prog.written, **({"heldout": counts["heldout"]} if heldout_every else {}),
               "skipped": dict(sorted(prog.skipped.items())),
               "skipped_total": sum(prog.skipped.values()), "skip_examples": prog.examples,
               "bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
               "shards": len(list(out.rglob("shard.*.mds"))), "seconds": round(time.time() - prog.t0, 2),
               "inputs": [str(s) for s in inputs], "workers": workers}
    (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
    if heldout_every and not counts["heldout"]:
        log.warning("--heldout-every %d: %d samples written, none held out (heldout/ is empty; "
                    "training with train.eval_every needs some)", heldout_every, prog.written)
    return summary


def adopt(pretrained: str | Path, out: str | Path, bos: str | None = None,
          eos: str | None = None) -> dict:
    """`out`/tokenizer.json: a pretrained model's tokenizer.json (`pretrained`, or the one in that
    directory) with the project's special tokens (`tokenizer.adopt_tokenizer`). The model's own
    BOS/EOS tokens (`bos`/`eos`, else those its files name: `specials.model_roles`) take those
    roles, written to `out`/tokenizer_roles.json. Returns a summary."""
    from mmpretrain.data.specials import ROLES, model_roles, write_roles
    from mmpretrain.data.tokenizer import TextTokenizer, adopt_tokenizer
    from tokenizers import Tokenizer

    source, out = Path(pretrained), Path(out)
    if source.is_dir():
        source = source / "tokenizer.json"
    if not source.is_file():
        raise ValueError(f"--from {pretrained}: no tokenizer.json there (a model with only a "
                         "SentencePiece .model: save it once with transformers' AutoTokenizer"
                         ".from_pretrained(dir).save_pretrained(dir))")
    if (out / "tokenizer.json").exists():
        raise ValueError(f"--out {out}: already holds a tokenizer.json")
    try:
        pretrained_tok = Tokenizer.from_file(str(source))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises its own Exception
        raise ValueError(f"--from {source}: not a tokenizer.json the tokenizers library reads "
                         f"({e})") from None
    size = pretrained_tok.get_vocab_size(with_added_tokens=True)
    roles = model_roles(source.parent, pretrained_tok)
    roles.update({r: t for r, t in (("bos", bos), ("eos", eos)) if t})
    try:
        adopted, added = adopt_tokenizer(pretrained_tok, roles)
        tok = TextTokenizer(adopted, roles)
    except ValueError as e:
        raise ValueError(f"--from {source}: {e} (roles {roles}; name others with --bos/--eos)") from None
    for role, verb in (("bos", "begins"), ("eos", "ends")):
        if role not in roles and ROLES[role] in added:
            log.warning("data tokenizer: %s names no %s token: every sample %s with a new %s, "
                        "learned from scratch (--%s TOKEN names one of the model's)", source.parent,
                        role.upper(), verb, ROLES[role], role)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.tokenizer.save(str(tmp))
    write_roles(out / "tokenizer.json", tok.role_tokens)
    tmp.replace(out / "tokenizer.json")
    return {"tokenizer": str(out / "tokenizer.json"), "from": str(source), "kept_ids": size,
            "added": added, "bos": tok.bos_token, "eos": tok.eos_token, "vocab_size": tok.vocab_size}


def build_tokenizer(datasets: list[str], out: str | Path, vocab_size: int) -> dict:
    """Train the byte-level BPE tokenizer (data/tokenizer.py: the project's special tokens at
    their fixed ids) on the text of built datasets (`data build` outputs, or their train/ split)
    and write `out`/tokenizer.json, so that `data.path: out` tokenizes them. Returns a summary."""
    from mmpretrain.data.source import open_dataset
    from mmpretrain.data.specials import write_roles
    from mmpretrain.data.tokenizer import train_tokenizer

    out = Path(out)
    if (out / "tokenizer.json").exists():
        raise ValueError(f"--out {out}: already holds a tokenizer.json")
    readers = [open_dataset(d) for d in datasets]  # a clear error before the (long) training
    counts, total, t0 = Counter(), sum(len(r) for r in readers), time.time()
    shown = t0

    def show(end: str = "") -> None:
        nonlocal shown
        shown = time.time()
        print(f"tokenizer: read {counts['samples']}/{total} samples, {counts['characters']} "
              f"characters ({shown - t0:.1f} s){end}", file=sys.stderr, flush=True)

    def texts():
        for reader in readers:
            for sample in reader:
                counts["samples"] += 1
                for seg in sample["segments"]:
                    if "text" in seg:
                        counts["characters"] += len(seg["text"])
                        yield seg["text"]
                if time.time() - shown >= PROGRESS_S:
                    show()
        show("; computing the merges")

    tok = train_tokenizer(texts(), vocab_size, progress=sys.stderr.isatty())
    if not counts["characters"]:
        raise ValueError(f"--input {', '.join(datasets)}: no text to train a tokenizer on")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "tokenizer.json.tmp"
    tok.save(str(tmp))
    write_roles(out / "tokenizer.json", None)  # a trained tokenizer's roles are the defaults
    tmp.replace(out / "tokenizer.json")
    return {"tokenizer": str(out / "tokenizer.json"), "samples": counts["samples"],
            "characters": counts["characters"],
            "vocab_size": tok.get_vocab_size(with_added_tokens=True)}
