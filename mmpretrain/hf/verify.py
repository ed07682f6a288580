"""`mmpretrain convert verify CKPT HF_DIR`: both models on the same inputs, logits compared.

Cases (`cases.py`): text only, one image, several images of different sizes in one sequence, in
the layout of the model's design (tiled images where the job tiles). Both models get identical
pixel tensors (random, already normalised) rather than each its own processor: the resize policies
differ on purpose (see `processor.py`), the weights and the computation are what is checked.
A remote-code export is loaded with `trust_remote_code=True` after checking that its code files
are the ones this version writes. Before any weights load, HF_DIR's config.json is compared with
the one the exporter writes for the checkpoint (format, design, sizes): another model's directory
is refused by name rather than fed inputs it cannot read. A remote-code export's processor is
checked against the training data path too (`processor_check.py`).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from mmpretrain.data.images import ImagePatches
from mmpretrain.data.packing import pack_rows
from mmpretrain.data.sequence import TokenSequence
from mmpretrain.hf import ConversionError, VerificationError, local
from mmpretrain.hf.cases import Case, design_cases, random_image, sample_cases  # noqa: F401
from mmpretrain.hf.configs import check_exportable
from mmpretrain.hf.processor_check import check_processor

log = logging.getLogger("mmpretrain")


def our_logits(model, case: Case, pad_id: int) -> torch.Tensor:
    """Our model's logits [s, v] (TP=1)."""
    from mmpretrain.parallel import cuda_to_cpu

    seq = TokenSequence(case.ids, [True] * len(case.ids), case.images, anchors=case.anchors)
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
        if is_remote(model.config):
            kwargs["image_tiles"] = torch.tensor([img.tile for img in case.images])
    with torch.no_grad():
        return model(input_ids=torch.tensor([case.ids]), **kwargs).logits[0].float()  # [s, v]


def is_remote(config) -> bool:
    """An NVLMForConditionalGeneration (remote-code) config."""
    return getattr(config, "model_type", None) == "nvlm"


def load_hf(hf_dir: str | Path):
    """The exported model in fp32, eval mode: LLaVA, or the remote-code model of the export."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    from mmpretrain.hf.remote import check_code

    conf = json.loads((Path(hf_dir) / "config.json").read_text())
    if conf.get("model_type") == "nvlm":
        check_code(Path(hf_dir))
        return AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True,
                                                    dtype=torch.float32).eval()
    return LlavaForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()


def round_like_export(model, hf_dir: Path) -> None:
    """Round our weights through the export's dtype, so a bf16 export compares like for like."""
    conf = json.loads((Path(hf_dir) / "config.json").read_text())
    dtype = getattr(torch, conf.get("dtype") or conf.get("torch_dtype") or "float32")
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype))


def compare(ours, theirs, tok, patch: int, cfg=None) -> dict[str, float]:
    """Max abs logit difference per case (`cfg`, the job config, is needed for a remote-code
    model: its cases follow the design)."""
    diffs = {}
    side = theirs.config.vision_config.image_size // patch
    cases = design_cases(cfg, tok, side) if is_remote(theirs.config) else sample_cases(tok, patch, side)
    for case in cases:
        a, b = our_logits(ours, case, tok.pad_id), hf_logits(theirs, case, patch)
        if a.shape != b.shape:
            raise VerificationError(f"{case.name}: logits {tuple(a.shape)} vs {tuple(b.shape)}")
        diffs[case.name] = (a - b).abs().max().item()
    return diffs


# Fields of config.json that say which model it is: top level, then per sub-config.
IDENTITY = ("design", "merge", "resize", "cross_attention_layers", "projector_hidden_size")
SIZES = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
         "num_attention_heads", "num_key_value_heads", "head_dim", "patch_size")


def config_differences(want: dict, got: dict) -> list[str]:
    """What differs between two HF configs (as dicts) in format, design and sizes."""
    if want["model_type"] != got.get("model_type"):
        return [f"model_type is {got.get('model_type')!r} there, {want['model_type']!r} for the "
                f"checkpoint"]
    fields = [(k, want.get(k), got.get(k)) for k in IDENTITY]
    for sub in ("text_config", "vision_config"):
        mine, theirs = want[sub], got.get(sub) or {}
        fields += [(f"{sub}.{k}", mine.get(k), theirs.get(k)) for k in SIZES if k in mine]
    return [f"{name} is {b!r} there, {a!r} for the checkpoint" for name, a, b in fields if a != b]


def check_export_of(path: Path, cfg, tok, hf_dir: Path) -> None:
    """HF_DIR's config.json is the one `to-hf` writes for this checkpoint (its format, design and
    sizes); else a ConversionError naming what differs. Reads configs only."""
    from mmpretrain.hf.export import FORMATS
    from mmpretrain.hf.import_ import read_config

    fmt = check_exportable(cfg)
    want = FORMATS[fmt].config(cfg, local.checkpoint_vocab(path), tok, "float32").to_dict()
    diffs = config_differences(want, read_config(hf_dir))
    if diffs:
        raise ConversionError(f"{hf_dir} is not an export of {path} (design {cfg.model.design}, "
                              f"exported as {fmt}): " + "; ".join(diffs))


def verify(ckpt: str | Path, hf_dir: str | Path, tol: float = 1e-3,
           tokenizer: str | Path | None = None) -> dict[str, float]:
    """Compare a checkpoint with its export; VerificationError above `tol`."""
    path = local.resolve_checkpoint(ckpt)
    cfg = local.checkpoint_config(path)
    tok = local.open_tokenizer(cfg, tokenizer, path)
    check_export_of(path, cfg, tok, Path(hf_dir))
    try:
        return verify_model(local.load_cpu_model(path, cfg, tok), cfg, tok, hf_dir, tol)
    except VerificationError as e:
        source = exported_from(Path(hf_dir))
        if source is None or source == path.resolve():
            raise
        raise VerificationError(f"{e}; {hf_dir} was exported from {source}, not {path}") from None


def exported_from(hf_dir: Path) -> Path | None:
    """The checkpoint an export of this project was written from (its mmpretrain.json)."""
    try:
        return Path(json.loads((hf_dir / "mmpretrain.json").read_text())["checkpoint"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_model(ours, cfg, tok, hf_dir: str | Path, tol: float = 1e-3) -> dict[str, float]:
    """`verify` with our model already loaded (its weights are rounded to the export's dtype)."""
    round_like_export(ours, Path(hf_dir))
    diffs = compare(ours, load_hf(hf_dir), tok, cfg.vision.patch_size, cfg)
    for name, d in diffs.items():
        print(f"verify: {name:15s} max abs logit diff {d:.3e}")
    worst = max(diffs.values())
    if not worst <= tol:
        raise VerificationError(f"logits differ by {worst:.3e} > tolerance {tol:g}")
    if check_exportable(cfg) == "nvlm":
        check_processor(cfg, tok, Path(hf_dir))
        print("verify: processor       token ids and pixels equal the training data path's")
    print(f"verify: ok (max abs diff {worst:.3e} <= {tol:g})")
    return diffs
