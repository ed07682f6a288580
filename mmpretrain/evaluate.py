"""`mmpretrain eval`: held-out loss of a run's latest checkpoint, with true and shuffled images.

`loss_shuffled_images` gives each sample the images of another sample with as many images, so the
text is unchanged and only the pictures are wrong; a model that reads its images scores worse.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from mmpretrain import checkpoint
from mmpretrain.config import Config, ConfigError, ParallelConfig, load
from mmpretrain.dataset import make_loader, model_vocab_size, open_tokenizer
from mmpretrain.model.build import build_model
from mmpretrain.parallel import cuda_to_cpu, init_distributed
from mmpretrain.train.step import eval_losses
from mmpretrain.train.validate import pack_samples, read_samples

log = logging.getLogger("mmpretrain")


def shuffle_images(samples: list[dict]) -> list[dict]:
    """Each sample with the images of the next sample that has the same number of images."""
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        if s["images"]:
            groups.setdefault(len(s["images"]), []).append(i)
    out = list(samples)
    for idx in groups.values():
        for a, b in zip(idx, idx[1:] + idx[:1]):
            out[a] = {**samples[a], "images": samples[b]["images"]}
    return out


def evaluate(run_dir: str | Path, samples: int = 256) -> dict:
    """Held-out loss per text token with true and with shuffled images, of a run's latest
    checkpoint or of the checkpoint `run_dir` is (its own config.yaml)."""
    run_dir = Path(run_dir)
    if (run_dir / "state.json").is_file() and (run_dir / "config.yaml").is_file():
        ckpt = run_dir  # a checkpoint directory: that step
    elif not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--run: {run_dir} has no config.yaml (is it a run or checkpoint "
                          f"directory?)")
    elif (ckpt := checkpoint.latest_checkpoint(run_dir)) is None:
        raise ConfigError(f"--run: {run_dir} has no checkpoint")
    cfg: Config = load(run_dir / "config.yaml")
    cfg.parallel = ParallelConfig()  # one process, whatever layout trained the run
    init_distributed(seed=cfg.train.seed)
    tok = open_tokenizer(cfg)
    with cuda_to_cpu():
        model = build_model(cfg, model_vocab_size(cfg, tok), tok.img_id)
        checkpoint.load_model(ckpt, model)
    model.eval()
    loader = make_loader(cfg, "heldout", tok, shuffle=False)
    n = min(samples, len(loader.reader))
    if n < samples:
        log.info("the held-out split has %d samples (--samples %d): evaluating all of them",
                 n, samples)
    held, unread = read_samples(loader.reader, range(n))
    result = {"checkpoint": str(ckpt), "samples": n}
    for name, chosen in (("loss", held), ("loss_shuffled_images", shuffle_images(held))):
        batches, unfit = pack_samples(chosen, loader, log_skips=name == "loss")
        total, count = eval_losses(model, batches)
        result[name] = total / max(count, 1)
        if name == "loss":
            result["text_tokens"] = count
            if unread + unfit:
                result["skipped_samples"] = unread + unfit  # unreadable or too long (logged)
    if not result["text_tokens"]:
        raise ConfigError(f"eval: the {n} held-out samples of {run_dir} have no text token to "
                          f"score ({unread + unfit} could not be used)")
    result["ratio"] = result["loss_shuffled_images"] / result["loss"]
    return result


def main(run_dir: str, samples: int) -> None:
    """Print the evaluation; its last line is one JSON object."""
    print(json.dumps(evaluate(run_dir, samples)))
