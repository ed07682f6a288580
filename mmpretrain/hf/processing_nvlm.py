"""NVLM's processor for the remote-code export: text with one `<image>` per image, plus the images,
-> the inputs of NVLMForConditionalGeneration, resized and laid out as training does it.

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    inputs = processor(text="<image>question: what is it? answer:", images=[image],
                       return_tensors="pt")
    model.generate(**inputs, max_new_tokens=8)

Images (PIL images, or [H, W(, C)] uint8/uint16 arrays) are read and resized by the training
code's own functions, shipped beside this file (`nvlm_pixels.py`, `nvlm_resize.py`,
`nvlm_tiling.py`): EXIF orientation applied and alpha composited over white, then resized at native
resolution under the token budget, or as NVLM tiles plus a global thumbnail. Each `<image>`
becomes what the design puts in the decoder's token stream:
    D native  [IMG] per projected patch, [IMG_BREAK] after each row but the last, [IMG_END] last
    D tiles   <tile_1> [IMG]... <tile_N> [IMG]... <tile_global_thumbnail> [IMG]...
    X         <image> (its tiles reach the decoder by cross-attention)
    H         <tile_1> ... <tile_N> <tile_global_thumbnail> [IMG]... (the thumbnail in stream)
Outputs: `input_ids` (the BOS token first), `attention_mask`, and with images `pixel_values` [n, 3, H, W]
(normalised, zero-padded to the largest), `image_sizes` [n, 2] and `image_tiles` [n] (0: a whole
image, k: its k-th tile, -1: its thumbnail), one row per tile or image in token order.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import BatchFeature, ProcessorMixin

try:  # in an export: the files beside this one
    from .nvlm_pixels import pillow_rgb, to_rgb
    from .nvlm_resize import native_size, normalize, resize, to_tensor
    from .nvlm_tiling import choose_grid
except ImportError:  # in the mmpretrain package
    from mmpretrain.data.pixels import pillow_rgb, to_rgb
    from mmpretrain.data.resize import native_size, normalize, resize, to_tensor
    from mmpretrain.data.tiling import choose_grid

IMAGE = "<image>"


class NVLMProcessor(ProcessorMixin):
    """The tokenizer plus the image settings of the job that trained the model."""

    attributes = ["tokenizer"]
    tokenizer_class = "AutoTokenizer"

    def __init__(self, tokenizer=None, design: str = "x", patch_size: int = 14, merge: int = 1,
                 resize: str = "native", token_budget: int = 1024, max_upscale: float = 2.0,
                 max_side: int = 0, tile_size: int = 448, max_tiles: int = 6, thumbnail: bool = True,
                 **kwargs):
        self.design, self.patch_size, self.merge, self.resize = design, patch_size, merge, resize
        self.token_budget, self.max_upscale, self.max_side = token_budget, max_upscale, max_side
        self.tile_size, self.max_tiles, self.thumbnail = tile_size, max_tiles, thumbnail
        super().__init__(tokenizer, **kwargs)

    def split(self, image) -> list[tuple[torch.Tensor, int]]:
        """One image -> [(uint8 [1, 3, h, w], tile)]: the whole image, or its tiles then thumbnail."""
        if hasattr(image, "getexif"):  # a PIL image: upright, alpha over white, as training reads it
            pixels = pillow_rgb(image)
        else:
            pixels = np.asarray(image)
            if pixels.dtype not in (np.uint8, np.uint16) or pixels.ndim not in (2, 3) or \
                    pixels.ndim == 3 and pixels.shape[2] not in (1, 2, 3, 4):
                raise ValueError(f"an image is a PIL image or an [H, W(, C)] uint8/uint16 array, "
                                 f"got {pixels.dtype} {list(pixels.shape)}")
            pixels = to_rgb(pixels)
        full, (h, w) = to_tensor(pixels), pixels.shape[:2]
        if self.resize == "native":
            size = native_size(h, w, self.patch_size, self.token_budget, self.merge,
                               self.max_upscale, self.max_side)
            return [(resize(full, *size), 0)]
        t = self.tile_size
        rows, cols = choose_grid(h, w, t, self.max_tiles)
        grid = resize(full, rows * t, cols * t)
        out = [(grid[..., r * t:(r + 1) * t, c * t:(c + 1) * t], 1 + r * cols + c)
               for r in range(rows) for c in range(cols)]
        if self.thumbnail and len(out) > 1:
            out.append((resize(full, t, t), -1))
        return out

    def grid(self, x: torch.Tensor) -> tuple[int, int]:
        """(rows, cols) of projected patches of one part [1, 3, h, w]."""
        unit = self.patch_size * self.merge
        return x.shape[-2] // unit, x.shape[-1] // unit

    def layout(self, parts: list[tuple[torch.Tensor, int]]) -> list[str]:
        """The tokens one image puts in the decoder's stream (see the module's table)."""
        def img(x):  # [IMG] per projected patch of one part
            rows, cols = self.grid(x)
            return ["[IMG]"] * (rows * cols)

        def tag(k):
            return "<tile_global_thumbnail>" if k == -1 else f"<tile_{k}>"

        if self.design == "x":
            return [IMAGE]
        if self.design == "h":
            return [tok for x, k in parts for tok in [tag(k)] + (img(x) if k == -1 else [])]
        if parts[0][1] == 0:
            rows, cols = self.grid(parts[0][0])
            return [t for r in range(rows) for t in ["[IMG]"] * cols
                    + ["[IMG_BREAK]" if r < rows - 1 else "[IMG_END]"]]
        return [tok for x, k in parts for tok in [tag(k)] + img(x)]

    def ids(self, text: str, images: list) -> tuple[list[int], list[tuple[torch.Tensor, int]]]:
        """BOS text... with each `<image>` replaced by its layout; the image parts in order."""
        pieces = text.split(IMAGE)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"{len(pieces) - 1} {IMAGE} in the text for {len(images)} images: "
                             f"put one {IMAGE} where each image goes")
        tok = self.tokenizer
        ids, parts = [tok.bos_token_id], []
        for i, piece in enumerate(pieces):
            if i:
                image = self.split(images[i - 1])
                ids += tok.convert_tokens_to_ids(self.layout(image))
                parts += image
            ids += tok(piece, add_special_tokens=False)["input_ids"] if piece else []
        return ids, parts

    def __call__(self, text=None, images=None, return_tensors=None, **kwargs) -> BatchFeature:
        """One text or a list; `images` in order of their `<image>`s (a flat list, or one list per
        text). Rows are padded on the tokenizer's padding side."""
        texts = [text] if isinstance(text, str) else list(text or [])
        if not texts:
            raise ValueError("give text, with one <image> where each image goes")
        images = [] if images is None else images if isinstance(images, (list, tuple)) else [images]
        if images and isinstance(images[0], (list, tuple)):  # one list per text
            per_text = [list(x) for x in images]
        else:  # a flat list, taken in order by each text's <image>s
            counts, it = [t.count(IMAGE) for t in texts], iter(images)
            if sum(counts) != len(images):
                raise ValueError(f"{sum(counts)} {IMAGE} in the text for {len(images)} images: put "
                                 f"one {IMAGE} where each image goes")
            per_text = [[next(it) for _ in range(n)] for n in counts]
        if len(per_text) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(per_text)} lists of images")
        rows, parts = [], []
        for t, imgs in zip(texts, per_text):
            ids, p = self.ids(t, imgs)
            rows.append(ids)
            parts += p
        data = self.pad(rows)
        if parts:
            data.update(self.pixels(parts))
        return BatchFeature(data, tensor_type=return_tensors)

    def pad(self, rows: list[list[int]]) -> dict[str, list[list[int]]]:
        """input_ids and attention_mask, padded to the longest row on the tokenizer's side."""
        width, pad, left = max(map(len, rows)), self.tokenizer.pad_token_id, \
            self.tokenizer.padding_side == "left"
        ids, mask = [], []
        for r in rows:
            fill = width - len(r)
            ids.append([pad] * fill + r if left else r + [pad] * fill)
            mask.append([0] * fill + [1] * len(r) if left else [1] * len(r) + [0] * fill)
        return {"input_ids": ids, "attention_mask": mask}

    @staticmethod
    def pixels(parts: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
        """pixel_values [n, 3, H, W] zero-padded, image_sizes [n, 2], image_tiles [n]."""
        h = max(x.shape[-2] for x, _ in parts)
        w = max(x.shape[-1] for x, _ in parts)
        values = torch.zeros(len(parts), 3, h, w)
        for i, (x, _) in enumerate(parts):
            values[i, :, :x.shape[-2], :x.shape[-1]] = normalize(x.reshape(1, -1)).view(x.shape[1:])
        sizes = torch.tensor([list(x.shape[-2:]) for x, _ in parts])
        return {"pixel_values": values, "image_sizes": sizes,
                "image_tiles": torch.tensor([k for _, k in parts])}

    def batch_decode(self, *args, **kwargs):
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.tokenizer.decode(*args, **kwargs)
