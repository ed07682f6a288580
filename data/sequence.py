"""A sample as decoder tokens: text ids and image placeholders, with the text-token flags.

Image layouts in the token stream (merge = the projector's pixel shuffle per side):
    native   [IMG] x cols/merge per row, [IMG_BREAK] after each row but the last, [IMG_END] last
    tiles    <tile_1> [IMG] x n ... <tile_N> [IMG] x n <tile_global_thumbnail> [IMG] x n
    design x one <image> marker per source image (its tiles reach the decoder by cross-attention)
    design h <tile_1> ... <tile_N> <tile_global_thumbnail> [IMG] x n (only the thumbnail in stream)
Each ImagePatches has an anchor: the token that introduces it (marker, tag or first placeholder).
Only text tokens (and the closing </s>) are loss targets; placeholders and tile tags are not.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mmpretrain.data.images import NATIVE, THUMBNAIL, ImagePatches


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is a short metric name."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class TokenSequence:
    """One sample, tokenized; images in order of their placeholders."""

    ids: list[int]
    is_text: list[bool]  # True where ids[i] is a text token (a loss target)
    images: list[ImagePatches] = field(default_factory=list)
    spans: list[tuple[int, int, int]] = field(default_factory=list)  # per source image:
    # (first token, end token, ImagePatches count) of its placeholder, in order
    anchors: list[int] = field(default_factory=list)  # per ImagePatches: its introducing token

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_patches(self) -> int:
        """Encoder patches of all its images."""
        return sum(img.rows * img.cols for img in self.images)


def image_placeholder(rows: int, cols: int, img: int, brk: int, end: int) -> list[int]:
    """Pixtral layout: `cols` [IMG] per row, [IMG_BREAK] after each row, [IMG_END] last."""
    out: list[int] = []
    for r in range(rows):
        out += [img] * cols + [brk if r < rows - 1 else end]
    return out


def tile_tag_id(tok, tile: int) -> int:
    """Token id of the tag introducing tile `tile` (1-based) or the thumbnail (-1)."""
    return tok.thumbnail_id if tile == THUMBNAIL else tok.tile_id(tile)


def image_tokens(parts: list[ImagePatches], tok, merge: int) -> list[int]:
    """Placeholder tokens of one source image: native layout, or tags + [IMG] runs for tiles."""
    return image_layout(parts, tok, merge)[0]


def image_layout(parts: list[ImagePatches], tok, merge: int,
                 design: str = "d") -> tuple[list[int], list[int]]:
    """(tokens of one source image in the decoder stream, offset of each part's anchor in them)."""
    if design == "x":
        return [tok.image_marker_id], [0] * len(parts)
    if design == "h":
        ids, anchors = [], []
        for p in parts:
            anchors.append(len(ids))
            n = (p.rows // merge) * (p.cols // merge) if p.tile == THUMBNAIL else 0
            ids += [tile_tag_id(tok, p.tile)] + [tok.img_id] * n
        return ids, anchors
    if len(parts) == 1 and parts[0].tile == NATIVE:
        p = parts[0]
        return image_placeholder(p.rows // merge, p.cols // merge, tok.img_id, tok.img_break_id,
                                 tok.img_end_id), [0]
    ids, anchors = [], []
    for p in parts:
        anchors.append(len(ids))
        ids += [tile_tag_id(tok, p.tile)] + [tok.img_id] * ((p.rows // merge) * (p.cols // merge))
    return ids, anchors


def check_text(text: str) -> str:
    """`text`, or SampleError('bad_text') when it is not valid Unicode (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SampleError("bad_text", f"text is not valid UTF-8: {e}") from None
    return text


def build_sequence(sample: dict, tok, prepare_image: Callable, merge: int = 1,
                   design: str = "d") -> TokenSequence:
    """BOS segments... EOS (`<s>`, `</s>` unless the tokenizer's roles name others), with each
    image replaced by its tokens for `design` (d, x or h).

    `prepare_image(sample["images"][k])` returns one ImagePatches or a list (tiles)."""
    seq = TokenSequence([tok.bos_id], [False])
    for seg in sample["segments"]:
        if "text" in seg:
            ids = tok.encode(check_text(seg["text"]))
            seq.ids += ids
            seq.is_text += [True] * len(ids)
        else:
            image = prepare_image(sample["images"][seg["image"]])
            parts = image if isinstance(image, list) else [image]
            ids, anchors = image_layout(parts, tok, merge, design)
            seq.spans.append((len(seq.ids), len(seq.ids) + len(ids), len(parts)))
            seq.anchors += [len(seq.ids) + a for a in anchors]
            seq.ids += ids
            seq.is_text += [False] * len(ids)
            seq.images += parts
    seq.ids.append(tok.eos_id)
    seq.is_text.append(True)
    return seq


def cut(seq: TokenSequence, at: int) -> TokenSequence:
    """The first `at` tokens, moved back to the start of an image placeholder `at` falls in."""
    kept, n_images = [], 0
    for start, end, n in seq.spans:
        if end > at:
            at = min(at, start)
            break
        kept.append((start, end, n))
        n_images += n
    return TokenSequence(seq.ids[:at], seq.is_text[:at], seq.images[:n_images], kept,
                         seq.anchors[:n_images])


def truncate(seq: TokenSequence, max_len: int, tok=None) -> TokenSequence:
    """Cut to `max_len` tokens without splitting an image: a cut image is dropped whole."""
    if len(seq) <= max_len:
        return seq
    if seq.spans or not seq.images:
        return cut(seq, max_len)
    ids, is_text = seq.ids[:max_len], seq.is_text[:max_len]  # no spans: native layout only
    n_images = sum(1 for t in ids if t == tok.img_end_id)
    while ids and ids[-1] in (tok.img_id, tok.img_break_id):
        ids, is_text = ids[:-1], is_text[:-1]
    return TokenSequence(ids, is_text, seq.images[:n_images], anchors=seq.anchors[:n_images])


def truncate_patches(seq: TokenSequence, max_patches: int) -> TokenSequence:
    """Cut before the first source image that takes the encoder past `max_patches` patches."""
    total, i = 0, 0
    for start, _, n in seq.spans:
        total += sum(img.rows * img.cols for img in seq.images[i:i + n])
        i += n
        if total > max_patches:
            return cut(seq, start)
    return seq
