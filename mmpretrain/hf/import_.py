"""`mmpretrain convert from-hf HF_DIR OUT --config JOB.yaml`: HF weights -> a run directory whose
`latest` checkpoint `mmpretrain train` starts from.

Sources: a LLaVA model with a Pixtral tower (all three parts), this project's remote-code export
(`model_type: nvlm`: all parts and the cross-attention layers of X/H; its config is read as JSON,
its code never run), or a Llama/Mistral causal LM (the decoder) plus, with `--vision-tower`, a
Pixtral vision model or another LLaVA's tower. What no source provides (the projector, or the
cross-attention layers of an X/H job fed from LLaVA) is initialised from the job's seed.

The model is never whole in memory: a model of the job config at TP=1/PP=1 on the meta device
names each tensor's shape and checkpoint key, and the checkpoint writer asks for one tensor at a
time (`checkpoint.save_weights_streamed`), converted from its HF group (read lazily from
safetensors) when it is needed. The parts no source provides are built alone, each from the job's
seed and its name (`local.build_cpu_parts`). The result is a weights-only dist checkpoint
`OUT/checkpoints/step_00000000`: training loads it under any layout and starts at step 1 with a
fresh optimizer, learning-rate schedule and data order.

OUT must not hold a run already (checkpoints): like `train --no-resume`, from-hf starts a new
one and refuses to take over another's `latest`.

Every HF tensor's shape is checked against what the job config needs before anything is copied;
a mismatch names the tensor. The vocabulary may be smaller than our padded embedding (rows
beyond it keep their initialisation), never larger.
"""
from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmpretrain.config import Config
from mmpretrain.data.tokenizer import id_changes
from mmpretrain.hf import ConversionError, local
from mmpretrain.hf.configs import (
    check_llava_config,
    check_text_config,
    check_vision_config,
    vision_layers_used,
)
from mmpretrain.hf.mapping import (
    DECODER,
    EMBED,
    LM_HEAD,
    PROJECTOR,
    VISION,
    Group,
    canonical_name,
    check_covers,
    model_tensors,
)
from mmpretrain.hf.remote import CROSS, CROSS_PREFIX, check_nvlm_config, nvlm_groups
from mmpretrain.hf.shards import WeightReader

log = logging.getLogger("mmpretrain")

VOCAB_TENSORS = (EMBED, LM_HEAD)
# Buffers some files carry that are no weights: rotary frequencies (older Llama conversions).
NOT_WEIGHTS = (".rotary_emb.inv_freq",)


@dataclass
class Source:
    """One HF directory: its config, its tensors under canonical names, the parts it gives."""

    dir: Path
    config: dict
    reader: WeightReader
    names: dict[str, str] = field(default_factory=dict)  # canonical -> name in the files
    parts: set[str] = field(default_factory=set)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the tensor with canonical name `name` (not read)."""
        return self.reader.shape(self.names[name])

    def get(self, name: str) -> torch.Tensor:
        """The tensor with canonical name `name`, read now."""
        return self.reader.get(self.names[name])


def read_config(directory: Path) -> dict:
    """An HF config with its defaults filled in, as a plain dict."""
    from transformers import AutoConfig

    if not (directory / "config.json").is_file():
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    if json.loads((directory / "config.json").read_text()).get("model_type") == "nvlm":
        from mmpretrain.hf.configuration_nvlm import NVLMConfig  # ours: the export's code is not run

        return NVLMConfig.from_pretrained(str(directory)).to_dict()
    return AutoConfig.from_pretrained(str(directory)).to_dict()


def kind_of(config: dict) -> str:
    """'llava', 'nvlm', 'causal_lm' or 'pixtral', from the config's model_type."""
    kind = config.get("model_type")
    if kind in ("llava", "nvlm"):
        return kind
    if kind in ("llama", "mistral"):
        return "causal_lm"
    if kind == "pixtral":
        return "pixtral"
    raise ConversionError(f"model_type={kind!r}: expected llava, nvlm, llama, mistral or pixtral")


def open_source(directory: str | Path, trust_pickle: bool, wanted: set[str]) -> Source:
    """An HF directory's tensors under canonical names, limited to the `wanted` parts."""
    directory = Path(directory)
    config = read_config(directory)
    kind = kind_of(config)
    src = Source(directory, config, WeightReader(directory, trust_pickle))
    prefixes = {CROSS: CROSS_PREFIX, VISION: "vision_tower.", PROJECTOR: "multi_modal_projector.",
                DECODER: "language_model."}  # the cross-attention layers' prefix first
    for name in src.reader.names():
        if name.endswith(NOT_WEIGHTS):
            continue
        canon = name if kind == "nvlm" else canonical_name(name, kind)
        part = next((p for p, pre in prefixes.items() if canon.startswith(pre)), None)
        if part in wanted:
            src.names[canon] = name
            src.parts.add(part)
    if DECODER in src.parts and LM_HEAD not in src.names and EMBED in src.names:
        src.names[LM_HEAD] = src.names[EMBED]  # tied input and output embeddings
    return src


def check_configs(src: Source, cfg: Config) -> None:
    """The HF configs compute what the job's model computes (fields that shapes cannot show)."""
    c = src.config
    if c["model_type"] == "nvlm":
        check_text_config(c["text_config"], cfg)
        check_vision_config(c["vision_config"], cfg)
        check_nvlm_config(c, cfg)
    elif c["model_type"] == "llava":
        if DECODER in src.parts:
            check_text_config(c["text_config"], cfg)
        if VISION in src.parts:
            check_vision_config(c["vision_config"], cfg)
        if PROJECTOR in src.parts:
            check_llava_config(c, cfg)
    elif c["model_type"] == "pixtral":
        check_vision_config(c, cfg)
    else:
        check_text_config(c, cfg)


def drop_unused_vision_layers(src: Source, cfg: Config) -> None:
    """A LLaVA tower whose feature layer is not the last: the layers after it feed nothing."""
    if src.config["model_type"] != "llava" or VISION not in src.parts:
        return
    used = vision_layers_used(src.config)
    for name in list(src.names):
        if name.startswith("vision_tower.transformer.layers."):
            if int(name.split(".")[3]) >= used:
                del src.names[name]


def expected_shapes(group: Group, ours: dict[str, torch.Tensor]) -> list[tuple[int, ...]]:
    """The HF shapes the job's model needs for this group (from meta tensors)."""
    meta = [torch.empty(ours[n].shape, device="meta") for n in group.ours]
    return [tuple(t.shape) for t in group.to_hf(*meta)]


def check_shapes(group: Group, src: Source, ours: dict[str, torch.Tensor], cfg: Config) -> None:
    """Each HF tensor of the group exists and has the shape the job config needs."""
    for name, want in zip(group.hf, expected_shapes(group, ours)):
        if name not in src.names:
            raise ConversionError(f"{src.dir}: no tensor {name}, which the job config's model needs "
                                  f"(vision.num_layers={cfg.vision.num_layers}, "
                                  f"decoder.num_layers={cfg.decoder.num_layers})")
        got = src.shape(name)
        if name in VOCAB_TENSORS and got[1:] == want[1:] and got[0] <= want[0]:
            continue  # a smaller vocabulary fills the first rows
        if got != want:
            raise ConversionError(f"{name}: shape {list(got)} in {src.dir}, but the job config needs "
                                  f"{list(want)}")


def check_unused(src: Source, groups: list[Group]) -> None:
    """No HF tensor of a used part is left over (e.g. more layers than the job config has)."""
    mapped = {n for g in groups for n in g.hf}
    extra = sorted(set(src.names) - mapped)
    if extra:
        raise ConversionError(f"{extra[0]} (and {len(extra) - 1} more) from {src.dir} has no place in "
                              f"the job config's model")


def plan_copies(sources: list[Source], groups: list[Group], ours: dict[str, torch.Tensor],
                cfg: Config) -> list[tuple[Group, Source]]:
    """(group, source) of every group a source provides, after checking every shape and that
    no HF tensor of a used part is left over."""
    check_covers(groups, ours)
    plan = []
    for src in sources:
        mine = [g for g in groups if g.part in src.parts]
        for g in mine:
            check_shapes(g, src, ours, cfg)
        check_unused(src, mine)
        plan += [(g, src) for g in mine]
    return plan


def part_of(name: str, prefixes) -> str | None:
    """The prefix in `prefixes` that names the part tensor `name` belongs to, or None."""
    return next((p for p in prefixes if name.startswith(p + ".")), None)


def fresh_prefixes(plan: list[tuple[Group, Source]], ours: dict[str, torch.Tensor],
                   cfg: Config) -> set[str]:
    """The model parts (`model.build.part_prefixes`) whose initialisation some tensor keeps:
    those no source provides, and the embedding and output layer when the HF vocabulary has
    fewer rows."""
    from mmpretrain.model.build import part_prefixes

    def prefix(name: str) -> str:
        found = part_of(name, part_prefixes(cfg))
        if found is None:
            raise ConversionError(f"from-hf: no source provides {name}, and it is in no part "
                                  f"that can be initialised alone")
        return found

    provided = {n for g, _ in plan for n in g.ours}
    keep = [n for n in ours if n not in provided]
    for g, src in plan:
        if any(h in VOCAB_TENSORS and src.shape(h)[0] < ours[o].shape[0] for h, o in zip(g.hf, g.ours)):
            keep += g.ours
    return {prefix(n) for n in keep}


class FreshParts:
    """The tensors of the parts no source provides: each part is built (`local.build_cpu_parts`,
    from its own seed) when its first tensor is asked for, and its tensors leave with the asks."""

    def __init__(self, cfg: Config, rows: int, prefixes: set[str]):
        self.cfg, self.rows, self.prefixes = cfg, rows, prefixes
        self.built: dict[str, torch.Tensor] = {}

    def __contains__(self, name: str) -> bool:
        return part_of(name, self.prefixes) is not None

    def pop(self, name: str) -> torch.Tensor:
        if name not in self.built:
            self.built.update(local.build_cpu_parts(self.cfg, self.rows, {part_of(name, self.prefixes)}))
        return self.built.pop(name)


class Filler:
    """Each tensor of the job's model when the checkpoint writer asks for it: converted from its
    HF group (the group's other tensors are kept for the next asks), else the fresh
    initialisation of its part; a smaller HF vocabulary fills the first rows of the fresh one."""

    def __init__(self, plan: list[tuple[Group, Source]], fresh: FreshParts, bar):
        self.source = {n: (g, src) for g, src in plan for n in g.ours}
        self.fresh, self.bar = fresh, bar
        self.converted: dict[str, torch.Tensor] = {}

    def __call__(self, name: str) -> torch.Tensor:
        self.bar.update()
        if name not in self.source:
            return self.fresh.pop(name)
        g, src = self.source[name]
        if name not in self.converted:
            self.bar.set_postfix_str(g.label, refresh=False)
            self.converted = dict(zip(g.ours, g.from_hf(*(src.get(n) for n in g.hf))))
        value = self.converted.pop(name)
        if name in self.fresh:
            base = self.fresh.pop(name)
            base[:value.shape[0]] = value
            return base
        return value


def warn_vocab(src: Source, tok, model_vocab: int) -> None:
    """Say when the HF vocabulary and the dataset's tokenizer disagree; a ConversionError when
    the HF embedding has more rows than the job's model can take."""
    if DECODER not in src.parts:
        return
    rows = src.shape(EMBED)[0]
    if rows > model_vocab:
        raise ConversionError(f"from-hf: the HF embedding has {rows} rows, more than the job's "
                              f"model's {model_vocab} (tokenizer {tok.vocab_size} ids): set "
                              f"decoder.vocab_size to {rows} or train with the HF model's tokenizer")
    if rows < model_vocab:
        log.warning("from-hf: the HF embedding has %d rows, the job's model %d (tokenizer %d ids); "
                    "rows %d.. keep their initialisation", rows, model_vocab, tok.vocab_size, rows)
    hf_tokenizer = src.dir / "tokenizer.json"
    if hf_tokenizer.is_file():
        from tokenizers import Tokenizer

        theirs = Tokenizer.from_file(str(hf_tokenizer))
        moved = id_changes(theirs, tok.tokenizer)
        if moved:
            log.warning("from-hf: %d of the %d tokens of %s have other ids in the job's tokenizer "
                        "(data.path): the embedding rows would be read as other tokens; give the "
                        "data the model's tokenizer (`mmpretrain data tokenizer --from %s --out "
                        "DATA`)", moved, theirs.get_vocab_size(with_added_tokens=True),
                        hf_tokenizer, src.dir)
    warn_roles(src, tok)
    image_id = src.config.get("image_token_index")
    if image_id is not None and image_id != tok.img_id:
        log.warning("from-hf: the HF image token id is %d, the tokenizer's [IMG] is %d",
                    image_id, tok.img_id)


def warn_roles(src: Source, tok) -> None:
    """Say when the model's files name a BOS/EOS the data's samples do not use."""
    from tokenizers import Tokenizer

    from mmpretrain.data.specials import model_roles

    path = src.dir / "tokenizer.json"
    try:
        named = model_roles(src.dir, Tokenizer.from_file(str(path)) if path.is_file() else None)
    except Exception as e:  # noqa: BLE001 - advice only: a file that does not read is left out
        log.warning("from-hf: the model's BOS/EOS are not known (%s)", e)
        return
    ours = tok.role_tokens
    for role, token in named.items():
        if token != ours[role]:
            log.warning("from-hf: the model's %s is %s, the data's samples use %s; `mmpretrain data "
                        "tokenizer --from %s --out DATA` gives the data the model's", role.upper(),
                        token, ours[role], src.dir)


def check_new_run(out: Path) -> None:
    """OUT can take a new run: not a file, no checkpoints in it; else a ConversionError."""
    from mmpretrain.checkpoint import checkpoint_root
    from mmpretrain.checkpoint.files import TMP_PREFIX

    local.check_not_under_file(out)
    root = checkpoint_root(out)  # a save killed midway leaves only its temporary directory
    if root.is_dir() and any(not p.name.startswith(TMP_PREFIX) for p in root.iterdir()):
        raise ConversionError(f"{out} already holds a run ({root} is not empty); from-hf starts a "
                              f"new run: pick an empty or new directory")


def import_hf(hf_dir: str | Path, out: str | Path, cfg: Config, vision_tower: str | Path | None = None,
              trust_pickle: bool = False) -> Path:
    """Write OUT/checkpoints/step_00000000 (and `latest`, OUT/config.yaml) from HF weights."""
    from tqdm import tqdm

    from mmpretrain import checkpoint
    from mmpretrain.config import dump
    from mmpretrain.dataset import model_vocab_size
    from mmpretrain.model.build import padded_vocab_size
    from mmpretrain.parallel import cuda_to_cpu

    out = Path(out)
    check_new_run(out)
    main = open_source(hf_dir, trust_pickle, {VISION, PROJECTOR, DECODER, CROSS})
    if DECODER not in main.parts:
        raise ConversionError(f"{hf_dir}: no language model tensors (language_model.* or model.*)")
    sources = [main]
    if vision_tower is not None:
        if VISION in main.parts:
            raise ConversionError(f"{hf_dir} has a vision tower already; --vision-tower would replace it")
        sources.append(open_source(vision_tower, trust_pickle, {VISION}))
        if VISION not in sources[-1].parts:
            raise ConversionError(f"{vision_tower}: no vision tower tensors")
    build_cfg = local.single_process(copy.deepcopy(cfg))
    if main.config.get("dtype") == "bfloat16":  # keep bf16 weights bf16 (half the memory)
        build_cfg.train.precision = "bf16"
    for src in sources:
        check_configs(src, build_cfg)
        drop_unused_vision_layers(src, build_cfg)
    tok = local.open_tokenizer(build_cfg)
    # the embedding rows the job trains with, padded for its layout's tp, built at TP=1
    rows = padded_vocab_size(model_vocab_size(build_cfg, tok), cfg.parallel.tp)
    model = local.build_cpu_model(build_cfg, tok, rows, meta=True)  # names, shapes, keys
    warn_vocab(main, tok, model.language_model.vocab_size)
    ours = model_tensors(model.state_dict())
    plan = plan_copies(sources, nvlm_groups(build_cfg), ours, build_cfg)
    prefixes = fresh_prefixes(plan, ours, build_cfg)
    parts = ", ".join(f"{part} <- {src.dir}" for src in sources for part in sorted(src.parts))
    log.info("from-hf: %s; initialised from the job's seed: %s", parts,
             ", ".join(sorted(prefixes)) or "nothing")
    fresh = FreshParts(build_cfg, rows, prefixes)
    with cuda_to_cpu(), tqdm(total=len(ours), desc="from-hf", unit="tensor") as bar:
        ckpt = checkpoint.save_weights_streamed(out, 0, model.sharded_state_dict(),
                                                Filler(plan, fresh, bar), cfg,
                                                source=str(Path(hf_dir).resolve()))
    dump(cfg, out / "config.yaml")
    log.info("from-hf: wrote %s; `mmpretrain train %s --run-dir %s` (or the job config, with "
             "the same --set) starts from it", ckpt, Path(out) / "config.yaml", out)
    return ckpt
