"""`mmpretrain convert verify CKPT HF_DIR`: both models on the same inputs, logits compared.

Cases: text only, one image, several images of different sizes in one sequence. Both models get
identical pixel tensors (random, already normalised) rather than each its own processor: the
resize policies differ on purpose (see `processor.py`), the weights are what is checked.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from mmpretrain.data.images import ImagePatches
from mmpretrain.data.packing import pack_rows
from mmpretrain.data.sequence import TokenSequence, image_placeholder
from mmpretrain.hf import VerificationError, local

log = logging.getLogger("mmpretrain")

TEXTS = ("a red circle at the top left and a blue square in the center.",
         "question: what color is the star? answer: green.", "the second picture shows")


@dataclass
class Case:
    """One input sequence and its images, in placeholder order."""

    name: str
    ids: list[int]
    images: list[ImagePatches]


def random_image(rows: int, cols: int, patch: int, seed: int) -> ImagePatches:
    """A normalised image of rows x cols patches as our encoder reads it."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(rows * cols, 3 * patch * patch, generator=g)  # [n, 3*p*p] (c, y, x)
    return ImagePatches(pixels, rows, cols)


def sample_cases(tok, patch: int, max_side: int = 64) -> list[Case]:
    """Text only; one image; three images of different sizes between text. Grids stay within
    `max_side` patches a side (HF Pixtral's RoPE table)."""
    text = [tok.encode(t) for t in TEXTS]

    def image(rows, cols, seed):
        rows, cols = min(rows, max_side), min(cols, max_side)
        img = random_image(rows, cols, patch, seed)
        return img, image_placeholder(rows, cols, tok.img_id, tok.img_break_id, tok.img_end_id)

    one, one_ids = image(3, 4, 1)
    grids = [image(2, 3, 2), image(4, 2, 3), image(1, 5, 4)]
    several = text[2] + grids[0][1] + text[0] + grids[1][1] + grids[2][1] + text[1]
    bos = [tok.bos_id]
    return [Case("text only", bos + text[0] + text[1], []),
            Case("one image", bos + one_ids + text[0], [one]),
            Case("several images", bos + several, [g[0] for g in grids])]


def our_logits(model, case: Case, pad_id: int) -> torch.Tensor:
    """Our model's logits [s, v] (TP=1)."""
    from mmpretrain.parallel import cuda_to_cpu

    seq = TokenSequence(case.ids, [True] * len(case.ids), case.images)
    batch = pack_rows([[seq]], len(case.ids), pad_id)
    device = next(model.parameters()).device  # the GPU when one is present
    with torch.no_grad(), cuda_to_cpu():
        return model(batch.to(device), with_loss=False)[0].float().cpu()  # [s, v]


def pixel_batch(images: list[ImagePatches], patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Our patches -> HF `pixel_values` [n, 3, H, W] (zero-padded) and `image_sizes` [n, 2] px."""
    h = max(i.rows for i in images) * patch
    w = max(i.cols for i in images) * patch
    out = torch.zeros(len(images), 3, h, w)
    for k, img in enumerate(images):
        x = img.patches.reshape(img.rows, img.cols, 3, patch, patch)  # [r, c, 3, p, p]
        out[k, :, :img.rows * patch, :img.cols * patch] = \
            x.permute(2, 0, 3, 1, 4).reshape(3, img.rows * patch, img.cols * patch)
    sizes = torch.tensor([[i.rows * patch, i.cols * patch] for i in images])
    return out, sizes


def hf_logits(model, case: Case, patch: int) -> torch.Tensor:
    """The transformers model's logits [s, v]."""
    kwargs = {}
    if case.images:
        kwargs["pixel_values"], kwargs["image_sizes"] = pixel_batch(case.images, patch)
    with torch.no_grad():
        return model(input_ids=torch.tensor([case.ids]), **kwargs).logits[0].float()  # [s, v]


def load_hf(hf_dir: str | Path):
    """The exported model in fp32, eval mode."""
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def round_like_export(model, hf_dir: Path) -> None:
    """Round our weights through the export's dtype, so a bf16 export compares like for like."""
    conf = json.loads((Path(hf_dir) / "config.json").read_text())
    dtype = getattr(torch, conf.get("dtype") or conf.get("torch_dtype") or "float32")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))


def compare(ours, theirs, tok, patch: int) -> dict[str, float]:
    """Max abs logit difference per case."""
    diffs = {}
    side = theirs.config.vision_config.image_size // patch
    for case in sample_cases(tok, patch, side):
        a, b = our_logits(ours, case, tok.pad_id), hf_logits(theirs, case, patch)
        if a.shape != b.shape:
            raise VerificationError(f"{case.name}: logits {tuple(a.shape)} vs {tuple(b.shape)}")
        diffs[case.name] = (a - b).abs().max().item()
    return diffs


def verify(ckpt: str | Path, hf_dir: str | Path, tol: float = 1e-3,
           tokenizer: str | Path | None = None) -> dict[str, float]:
    """Compare a checkpoint with its export; VerificationError above `tol`."""
    path = local.resolve_checkpoint(ckpt)
    cfg = local.checkpoint_config(path)
    tok = local.open_tokenizer(cfg, tokenizer)
    ours = local.load_cpu_model(path, cfg, tok)
    round_like_export(ours, Path(hf_dir))
    diffs = compare(ours, load_hf(hf_dir), tok, cfg.vision.patch_size)
    for name, d in diffs.items():
        print(f"verify: {name:15s} max abs logit diff {d:.3e}")
    worst = max(diffs.values())
    if not worst <= tol:
        raise VerificationError(f"logits differ by {worst:.3e} > tolerance {tol:g}")
    print(f"verify: ok (max abs diff {worst:.3e} <= {tol:g})")
    return diffs
