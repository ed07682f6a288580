"""Users' data -> samples (see shards.py for the sample format).

Inputs `mmpretrain data build` reads, one raw record at a time:
- JSONL (`.jsonl`, one JSON object a line; image paths relative to the file):
    pair          {"image": "a.jpg", "text" | "caption": "..."}
    conversation  {"image": "a.jpg" | ["a.jpg", ...], "conversations": [{"from": "human",
                   "value": "<image>\\nWhat is it?"}, {"from": "gpt", "value": "A cat."}, ...]}
    interleaved   {"segments": [{"text": "..."}, {"image": "a.jpg"}, ...]}  or
                  {"texts": ["...", null, ...], "images": [null, "a.jpg", ...]} (parallel lists)
- JSON (`.json`): one array of such objects, as LLaVA's instruction files ship.
- WebDataset tars (`.tar`, or a directory of them): members grouped by key (the name up to the
  first dot); an image (.jpg .jpeg .png .webp) plus .txt (the caption) or .json ("caption"/"text").
`to_sample` turns a raw record into a sample or raises RecordError with a skip reason.
"""
from __future__ import annotations

import json
import logging
import lzma
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
log = logging.getLogger("mmpretrain")
DAMAGED = "__damaged__"  # a RawRecord's data key: where an input file stopped being readable
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}


class RecordError(ValueError):
    """A record that becomes no sample; `reason` names the skip counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason  # bad_record | missing_file | empty_text | undecodable_image |
        # oversize_image | damaged_tar


@dataclass
class RawRecord:
    """One record as read: the parsed JSON (or tar group), where it came from, its image bytes."""

    where: str  # "<file>:<line>" or "<tar>:<key>"
    data: dict
    base: str = ""  # directory image paths are relative to ("" for tars)
    blobs: dict[str, bytes] = field(default_factory=dict)  # tar members by extension


def read_jsonl(path: Path) -> Iterator[RawRecord]:
    """One RawRecord per non-empty line; a line that is not a JSON object is a bad record."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                data = {"__error__": f"not JSON: {e}"}
            if not isinstance(data, dict):
                data = {"__error__": "not a JSON object"}
            yield RawRecord(f"{path}:{n}", data, str(path.parent))


def _ends_cleanly(tar: tarfile.TarFile) -> bool:
    """Whether the end-of-archive (zero) block is where tarfile stopped reading: past the first
    member it takes a damaged or cut header for the end of the archive, and says nothing."""
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    return len(block) == tarfile.BLOCKSIZE and not any(block)


def read_tar(path: Path) -> Iterator[RawRecord]:
    """One RawRecord per key of a WebDataset tar (members of a key are consecutive). A tar that
    is cut short or damaged (a partial download) gives the keys read before the damage, then one
    record marked damaged for the rest of the file."""
    key, blobs = None, {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                k, _, ext = name.partition(".")
                k = member.name[: len(member.name) - len(name)] + k
                if key is not None and k != key:
                    yield RawRecord(f"{path}:{key}", {}, "", blobs)
                    blobs = {}
                key = k
                blobs["." + ext.lower()] = tar.extractfile(member).read()
            if not _ends_cleanly(tar):
                raise tarfile.ReadError("a damaged header, or the file ends without the "
                                        "end-of-archive block")
    except (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError) as e:
        where = f"{path}:{key}" if key is not None else f"{path}"
        yield RawRecord(where, {DAMAGED: f"the tar is damaged or cut short here ({e}); the "
                                          f"rest of the file is skipped"})
        return
    if key is not None:
        yield RawRecord(f"{path}:{key}", {}, "", blobs)


def read_json(path: Path) -> Iterator[RawRecord]:
    """One RawRecord per element of a JSON array (LLaVA's instruction files)."""
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--input {path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"--input {path}: a .json input holds an array of records, not a "
                         f"{type(data).__name__} (one record a line: .jsonl)")
    for n, item in enumerate(data):
        yield RawRecord(f"{path}[{n}]", item if isinstance(item, dict) else
                        {"__error__": "not a JSON object"}, str(path.parent))


READERS = {".jsonl": read_jsonl, ".json": read_json, ".tar": read_tar}


TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")


def reader_of(path: Path):
    """The reader of a file by its name (any case; compressed tars too), or None."""
    name = path.name.lower()
    return read_tar if name.endswith(TAR_SUFFIXES) else READERS.get(Path(name).suffix)


def input_files(spec: str) -> list[Path]:
    """The files of one --input: a .jsonl, .json or .tar (.tar.gz, ...) file, or a directory of
    them (other files there are named in a warning); else a FileNotFoundError naming it (before
    anything is written)."""
    path = Path(spec)
    if path.is_dir():
        entries = sorted(p for p in path.iterdir() if p.is_file())
        files = [p for p in entries if reader_of(p)]
        if not files:
            raise FileNotFoundError(f"--input {spec}: no .jsonl, .json or .tar files")
        others = [p.name for p in entries if not reader_of(p)]
        if others:
            log.warning("--input %s: %d file(s) not read (not .jsonl, .json or .tar): %s", spec,
                        len(others), ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))
        return files
    if reader_of(path) and path.is_file():
        return [path]
    if not path.exists():
        raise FileNotFoundError(f"--input {spec}: no such file or directory")
    raise FileNotFoundError(f"--input {spec}: not a .jsonl, .json or .tar file nor a directory "
                            "of them")


def check_input(path: Path) -> None:
    """What can be told of an input file before the build reads it: a .json holds an array (its
    first character), else a ValueError naming it."""
    if reader_of(path) is read_json:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if not head.startswith(b"["):
            raise ValueError(f"--input {path}: a .json input holds an array of records (one "
                             f"record a line: .jsonl); this one does not start with '['")


def read_input(spec: str) -> Iterator[RawRecord]:
    """Records of a .jsonl, .json or .tar file, or of a directory of them."""
    for path in input_files(spec):
        yield from reader_of(path)(path)


def _load(base: str, rel) -> bytes:
    if not isinstance(rel, str) or not rel:
        raise RecordError("bad_record", f"image path {rel!r} is not a string")
    path = Path(base) / rel
    try:
        return path.read_bytes()
    except OSError as e:
        raise RecordError("missing_file", f"{path}: {e.strerror or e}") from None


def _text(value) -> str:
    if not isinstance(value, str):
        raise RecordError("bad_record", f"text {value!r} is not a string")
    return value


def conversation_segments(turns, n_images: int) -> list[dict]:
    """LLaVA turns -> segments; each `<image>` in the text places the next image (unplaced ones
    go first; more placeholders than images is a bad record), each turn is written 'user: ...' /
    'assistant: ...' on its own line."""
    if not isinstance(turns, list) or not turns:
        raise RecordError("bad_record", "conversations must be a non-empty list")
    for n, t in enumerate(turns):
        if not isinstance(t, dict) or not isinstance(t.get("from"), str) or not t["from"]:
            raise RecordError("bad_record", f"conversation turn {n} is not an object with a "
                              f"\"from\" role: {str(t)[:80]!r}")
    text = "\n".join(f"{ROLES.get(t['from'], t['from'])}: {_text(t.get('value'))}" for t in turns)
    pieces = text.split("<image>")
    if len(pieces) - 1 > n_images:  # a placeholder with no image: the record is broken
        raise RecordError("bad_record", f"{len(pieces) - 1} <image> placeholders for {n_images} "
                          "image(s)")
    placed = len(pieces) - 1
    segments: list[dict] = [{"image": k} for k in range(placed, n_images)]
    for k, piece in enumerate(pieces):
        if piece.strip():
            segments.append({"text": piece.strip("\n") if k else piece.lstrip("\n")})
        if k < placed:
            segments.append({"image": k})
    return segments


def _texts_images(texts, images) -> list[dict]:
    """The OBELICS form (`texts` and `images` side by side, one of each pair None) as segments."""
    if not (isinstance(texts, list) and isinstance(images, list) and len(texts) == len(images)):
        raise RecordError("bad_record", "texts and images must be lists of the same length")
    return [{"text": t} if t is not None else {"image": i} for t, i in zip(texts, images)]


def _jsonl_sample(rec: RawRecord) -> tuple[str, list[dict], list[bytes]]:
    d = rec.data
    if "__error__" in d:
        raise RecordError("bad_record", d["__error__"])
    if "segments" in d or ("texts" in d and "images" in d):
        segs = d["segments"] if "segments" in d else _texts_images(d["texts"], d["images"])
        if not isinstance(segs, list):
            raise RecordError("bad_record", f"segments must be a list, not {type(segs).__name__}")
        images, segments = [], []
        for seg in segs:
            if isinstance(seg, dict) and "image" in seg:
                images.append(_load(rec.base, seg["image"]))
                segments.append({"image": len(images) - 1})
            elif isinstance(seg, dict) and "text" in seg:
                segments.append({"text": _text(seg["text"])})
            else:
                raise RecordError("bad_record", f"bad segment {seg!r}")
        return "interleaved", segments, images
    paths = d.get("image")
    paths = [] if paths is None else paths if isinstance(paths, list) else [paths]
    images = [_load(rec.base, p) for p in paths]
    if "conversations" in d:
        return "conversation", conversation_segments(d["conversations"], len(images)), images
    text = d.get("text", d.get("caption"))
    if text is None:
        raise RecordError("bad_record", "no text, caption, conversations or segments")
    return "caption", [{"image": k} for k in range(len(images))] + [{"text": _text(text)}], images


def _tar_sample(rec: RawRecord) -> tuple[str, list[dict], list[bytes]]:
    image = next((rec.blobs[e] for e in IMAGE_EXTS if e in rec.blobs), None)
    if image is None:
        raise RecordError("missing_file", f"no image member ({', '.join(IMAGE_EXTS)})")
    if ".txt" in rec.blobs:
        try:
            text = rec.blobs[".txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError("bad_record", f".txt is not UTF-8: {e}") from None
    elif ".json" in rec.blobs:
        try:
            meta = json.loads(rec.blobs[".json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError("bad_record", f".json: {e}") from None
        text = _text(meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None)
    else:
        raise RecordError("empty_text", "no .txt or .json member")
    return "caption", [{"image": 0}, {"text": text}], [image]


def to_sample(rec: RawRecord, index: int) -> dict:
    """The sample of a raw record (images not yet checked), or RecordError."""
    if DAMAGED in rec.data:
        raise RecordError("damaged_tar", rec.data[DAMAGED])
    kind, segments, images = _tar_sample(rec) if rec.blobs else _jsonl_sample(rec)
    if not any(seg.get("text", "").strip() for seg in segments):
        raise RecordError("empty_text", "no text")
    return {"id": f"{index:09d}", "kind": kind, "segments": segments, "images": images}
