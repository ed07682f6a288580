"""`convert verify` of a remote-code export also checks its processor: two synthetic scenes (a
wide and a tall one) through the export's `AutoProcessor` and through the training data path give
the same token ids and the same pixels, bit for bit. A processor_config.json edited by hand, or
a processor that no longer matches training, fails the verification by name."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from mmpretrain.hf import VerificationError

TEXTS = ("question: what is on the left?", "and here?", "answer:")


def scenes() -> list[bytes]:
    """A wide and a tall synthetic image (PNG)."""
    from PIL import Image

    from mmpretrain.data.synth import render, sample_scene

    out = []
    for seed, (w, h) in ((1, (96, 48)), (2, (40, 88))):
        image = Image.open(io.BytesIO(render(sample_scene(np.random.default_rng(seed)))))
        buf = io.BytesIO()
        image.convert("RGB").resize((w, h)).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def training_inputs(cfg, tok, encoded: list[bytes]) -> tuple[list[int], list]:
    """(ids without the closing </s>, normalised ImagePatches) the data path builds."""
    from mmpretrain.data.images import ImagePatches, ImagePreparer
    from mmpretrain.data.resize import normalize
    from mmpretrain.data.sequence import build_sequence
    from mmpretrain.dataset import image_settings

    settings = image_settings(cfg)
    settings.decoder = "pillow"
    sample = {"images": encoded, "segments": [{"text": TEXTS[0]}, {"image": 0}, {"text": TEXTS[1]},
                                              {"image": 1}, {"text": TEXTS[2]}]}
    seq = build_sequence(sample, tok, ImagePreparer(settings), cfg.projector.merge, cfg.model.design)
    return seq.ids[:-1], [ImagePatches(normalize(i.patches), i.rows, i.cols, i.tile) for i in seq.images]


def check_processor(cfg, tok, hf_dir: Path) -> None:
    """VerificationError unless the export's processor gives the training data path's inputs."""
    from PIL import Image
    from transformers import AutoProcessor

    from mmpretrain.hf.verify import pixel_batch

    encoded = scenes()
    ids, images = training_inputs(cfg, tok, encoded)
    processor = AutoProcessor.from_pretrained(str(hf_dir), trust_remote_code=True)
    text = f"{TEXTS[0]}<image>{TEXTS[1]}<image>{TEXTS[2]}"
    got = processor(text=text, images=[Image.open(io.BytesIO(b)) for b in encoded],
                    return_tensors="pt")
    pixels, sizes = pixel_batch(images, cfg.vision.patch_size)
    differ = [name for name, same in (
        ("input_ids", got["input_ids"][0].tolist() == ids),
        ("image_sizes", torch.equal(got["image_sizes"], sizes)),
        ("image_tiles", got["image_tiles"].tolist() == [i.tile for i in images]),
        ("pixel_values", got["pixel_values"].shape == pixels.shape
         and torch.equal(got["pixel_values"], pixels))) if not same]
    if differ:
        raise VerificationError(f"the export's processor differs from training on {', '.join(differ)}"
                                f" (processor_config.json edited? export again)")
