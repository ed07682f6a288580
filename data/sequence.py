"""A sample as decoder tokens: text ids and image placeholders, with the text-token flags."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mmpretrain.data.images import ImagePatches


@dataclass
class TokenSequence:
    """One sample, tokenized; images in order of their placeholders."""

    ids: list[int]
    is_text: list[bool]  # True where ids[i] is a text token (a loss target)
    images: list[ImagePatches] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


def image_placeholder(rows: int, cols: int, img: int, brk: int, end: int) -> list[int]:
    """Pixtral layout: `cols` [IMG] per row, [IMG_BREAK] after each row, [IMG_END] last."""
    out: list[int] = []
    for r in range(rows):
        out += [img] * cols + [brk if r < rows - 1 else end]
    return out


def build_sequence(sample: dict, tok, prepare_image: Callable[[bytes], ImagePatches],
                   merge: int = 1) -> TokenSequence:
    """<s> segments... </s>, with each image replaced by its placeholder tokens."""
    seq = TokenSequence([tok.bos_id], [False])
    for seg in sample["segments"]:
        if "text" in seg:
            ids = tok.encode(seg["text"])
            seq.ids += ids
            seq.is_text += [True] * len(ids)
        else:
            image = prepare_image(sample["images"][seg["image"]])
            ids = image_placeholder(image.rows // merge, image.cols // merge,
                                    tok.img_id, tok.img_break_id, tok.img_end_id)
            seq.ids += ids
            seq.is_text += [False] * len(ids)
            seq.images.append(image)
    seq.ids.append(tok.eos_id)
    seq.is_text.append(True)
    return seq


def truncate(seq: TokenSequence, max_len: int, tok) -> TokenSequence:
    """Cut to `max_len` tokens without splitting an image: a cut image is dropped whole."""
    if len(seq) <= max_len:
        return seq
    ids, is_text = seq.ids[:max_len], seq.is_text[:max_len]
    n_images = sum(1 for t in ids if t == tok.img_end_id)
    inside = (tok.img_id, tok.img_break_id)
    while ids and ids[-1] in inside:  # the cut falls inside an image: end before it
        ids, is_text = ids[:-1], is_text[:-1]
    return TokenSequence(ids, is_text, seq.images[:n_images])
