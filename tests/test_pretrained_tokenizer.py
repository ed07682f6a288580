"""A pretrained model's tokenizer adopted for the data (`data tokenizer --from`): its ids kept, the
project's special tokens it lacks added after them, and everything downstream (packing, training,
export with its processor) working with special tokens at ids other than 0..20."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_helpers import TEXTS, random_checkpoint, tiny_config
from mmpretrain.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, adopt_tokenizer
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent


def pretrained_tokenizer(path: Path) -> Tokenizer:
    """A Llama-like tokenizer: <unk> <s> </s> at 0 1 2, a Metaspace pre-tokenizer, [IMG] at the
    end as Mistral's has it, none of the project's other special tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>"],
                                  show_progress=False)
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    tok.add_special_tokens(["[IMG]"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return tok


def adopt_cli(source: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmpretrain", "data", "tokenizer", "--from",
                           str(source), "--out", str(out), *flags], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_adopting_keeps_every_id_and_adds_the_missing_special_tokens(tmp_path):
    pre = pretrained_tokenizer(tmp_path / "llm")
    r = adopt_cli(tmp_path / "llm", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["added"] == [t for t in SPECIAL_TOKENS if t not in ("<unk>", "<s>", "</s>", "[IMG]")]
    tok = TextTokenizer.load(tmp_path / "data" / "tokenizer.json")
    before = pre.get_vocab(with_added_tokens=True)
    after = tok.tokenizer.get_vocab(with_added_tokens=True)
    assert {t: after[t] for t in before} == before  # every pretrained id kept
    assert sorted(after.values()) == list(range(len(after)))
    assert (tok.bos_id, tok.eos_id, tok.img_id) == (1, 2, before["[IMG]"])
    assert tok.pad_id == len(before) and summary["vocab_size"] == len(after) == tok.vocab_size
    text = "a small red circle at the center. question: what color is it?"
    assert tok.encode(text) == pre.encode(text, add_special_tokens=False).ids
    assert tok.encode("[IMG]<tile_3>", specials=True) == [tok.img_id, tok.tile_id(3)]
    assert adopt_cli(tmp_path / "llm", tmp_path / "data").returncode == 2  # not over a tokenizer
    r = adopt_cli(tmp_path / "nothing", tmp_path / "elsewhere")
    assert r.returncode == 2 and "no tokenizer.json there" in r.stderr
    with pytest.raises(ValueError, match="lacks the special tokens <pad>"):
        TextTokenizer.load(tmp_path / "llm" / "tokenizer.json")


@pytest.mark.parametrize("design", ["d", "h"])
def test_training_and_export_with_an_adopted_tokenizer(small_dataset, tmp_path, design, capsys):
    """The synthetic dataset tokenized by an adopted tokenizer: training steps run with finite
    losses, and an export verifies (logits, and the processor giving the training path's ids and
    pixels)."""
    from hf_helpers import design_config

    from mmpretrain.cli import main
    from mmpretrain.config import load
    from mmpretrain.train.loop import train

    pretrained_tokenizer(tmp_path / "llm")
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    (data / "tokenizer.json").unlink()
    assert adopt_cli(tmp_path / "llm", data).returncode == 0
    cfg = load(f"jobs/tiny-{design}.yaml", [f"data.path={data}", "data.seq_length=128",
                                             "data.micro_batch_size=2", "data.image_token_budget=16",
                                             "train.global_batch_size=2", "train.steps=2",
                                             "logging.tensorboard=false"])
    record = train(cfg, tmp_path / "run")
    assert record["step"] == 2 and record["loss"] == record["loss"]  # ran, finite
    tok = TextTokenizer.load(data / "tokenizer.json")
    ckpt = random_checkpoint(tmp_path / "rand", design_config(data, design, tiles=design == "h"),
                             tok, seed=2)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "verify: ok" in capsys.readouterr().out


def test_from_hf_warns_when_the_data_tokenizer_moves_the_models_ids(tmp_path, caplog):
    """A causal LM whose tokenizer.json the job's tokenizer does not keep, and whose EOS the
    data's samples do not end with: the import says how many of its tokens the data's ids would
    read as others, which role differs, and how to adopt the model's tokenizer."""
    from hf_helpers import save_causal_lm, write_dataset_tokenizer

    from mmpretrain.hf.import_ import import_hf

    cfg = tiny_config(tmp_path / "data")
    write_dataset_tokenizer(tmp_path / "data")
    save_causal_lm(tmp_path / "llm", cfg)
    pretrained_tokenizer(tmp_path / "llm")
    (tmp_path / "llm" / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "<|endoftext|>"}))
    import_hf(tmp_path / "llm", tmp_path / "run", cfg)
    assert "have other ids in the job's tokenizer" in caplog.text
    assert f"data tokenizer --from {tmp_path / 'llm'}" in caplog.text
    assert "the model's EOS is <|endoftext|>, the data's samples use </s>" in caplog.text
    assert "the model's BOS" not in caplog.text  # the same <s>


def qwen_like_tokenizer(path: Path) -> Tokenizer:
    """A Qwen-like tokenizer: byte-level BPE, no BOS, `<|endoftext|>` its EOS (tokenizer_config.json
    says so), its control tokens after the merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 3, trainer=trainer)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return tok


def test_a_models_own_eos_takes_the_role(tmp_path):
    """tokenizer_config.json's eos_token ends every sample (its pretrained id, no new `</s>`);
    --eos names another; a token the model lacks, or one with another use, is refused."""
    from mmpretrain.data.sequence import build_sequence
    from mmpretrain.data.specials import ROLES_FILE

    pre = qwen_like_tokenizer(tmp_path / "llm")
    r = adopt_cli(tmp_path / "llm", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.splitlines()[-1])
    assert (summary["bos"], summary["eos"]) == ("<s>", "<|endoftext|>")
    assert "<s>" in summary["added"] and "</s>" not in summary["added"]
    assert "names no BOS token: every sample begins with a new <s>" in r.stderr  # bos_token: null
    assert json.loads((tmp_path / "data" / ROLES_FILE).read_text()) == {"bos": "<s>",
                                                                        "eos": "<|endoftext|>"}
    tok = TextTokenizer.load(tmp_path / "data" / "tokenizer.json")
    assert tok.eos_id == pre.token_to_id("<|endoftext|>") and tok.tokenizer.token_to_id("</s>") is None
    seq = build_sequence({"segments": [{"text": "a red circle"}], "images": []}, tok, None)
    assert (seq.ids[0], seq.ids[-1], seq.is_text[-1]) == (tok.bos_id, tok.eos_id, True)

    r = adopt_cli(tmp_path / "llm", tmp_path / "chat", "--eos", "<|im_end|>")
    assert r.returncode == 0, r.stderr
    assert TextTokenizer.load(tmp_path / "chat" / "tokenizer.json").eos_id == pre.token_to_id("<|im_end|>")
    r = adopt_cli(tmp_path / "llm", tmp_path / "x", "--eos", "<nope>")
    assert r.returncode == 2 and "has no token '<nope>'" in r.stderr and not (tmp_path / "x").exists()
    r = adopt_cli(tmp_path / "llm", tmp_path / "x", "--bos", "[IMG]")
    assert r.returncode == 2 and "their own use" in r.stderr
    for name in ("data", "chat"):  # the roles lost: an adopted tokenizer does not load
        (tmp_path / name / ROLES_FILE).unlink()
        with pytest.raises(ValueError, match=f"an adopted tokenizer .* without {ROLES_FILE}"):
            TextTokenizer.load(tmp_path / name / "tokenizer.json")


@pytest.mark.parametrize("where", ["special_tokens_map.json", "config.json"])
def test_roles_from_the_models_other_files(tmp_path, where):
    """A GPT-2 style model whose tokenizer_config.json names no special tokens: the roles come
    from special_tokens_map.json, else from config.json's token ids; tokenizer_config.json's
    explicit null (no BOS) is not looked past."""
    from mmpretrain.data.specials import model_roles

    pre = qwen_like_tokenizer(tmp_path / "llm")
    end = pre.token_to_id("<|endoftext|>")
    (tmp_path / "llm" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}))
    files = {"special_tokens_map.json": {"bos_token": "<|endoftext|>",
                                         "eos_token": {"content": "<|endoftext|>"}},
             "config.json": {"bos_token_id": end, "eos_token_id": [end, end + 2]}}
    (tmp_path / "llm" / where).write_text(json.dumps(files[where]))
    r = adopt_cli(tmp_path / "llm", tmp_path / "data")
    assert r.returncode == 0, r.stderr
    tok = TextTokenizer.load(tmp_path / "data" / "tokenizer.json")
    assert tok.bos_id == tok.eos_id == end and "names no" not in r.stderr
    assert tok.tokenizer.token_to_id("<s>") is None and tok.tokenizer.token_to_id("</s>") is None
    (tmp_path / "llm" / "tokenizer_config.json").write_text(json.dumps({"bos_token": None}))
    assert model_roles(tmp_path / "llm", pre) == {"eos": "<|endoftext|>"}


def test_the_exported_tokenizer_prepends_any_bos(tmp_path):
    """The export's post-processor puts the BOS first whatever its text (tokenizers' templates
    read `:` in a piece as a type id)."""
    from mmpretrain.hf.processor import hf_tokenizer

    pre = qwen_like_tokenizer(tmp_path / "llm")
    pre.add_special_tokens(["<|turn:start|>"])
    tok = TextTokenizer(adopt_tokenizer(pre, {"bos": "<|turn:start|>"})[0], {"bos": "<|turn:start|>"})
    ids = hf_tokenizer(tok, 128)("a red circle").input_ids
    assert ids[0] == tok.bos_id == pre.token_to_id("<|turn:start|>") and ids[1:] == tok.encode("a red circle")


def test_export_with_a_models_own_eos(small_dataset, tmp_path, capsys):
    """The checkpoint keeps the roles with its tokenizer; the export's tokenizer, generation
    config and model config name the model's EOS, and the processor's ids verify."""
    from hf_helpers import design_config
    from mmpretrain.data.specials import ROLES_FILE
    from transformers import AutoTokenizer, GenerationConfig

    from mmpretrain.cli import main
    from mmpretrain.hf import ConversionError
    from mmpretrain.hf.export import export

    pre = qwen_like_tokenizer(tmp_path / "llm")
    data = tmp_path / "data"
    shutil.copytree(small_dataset, data)
    (data / "tokenizer.json").unlink()
    assert adopt_cli(tmp_path / "llm", data).returncode == 0
    tok = TextTokenizer.load(data / "tokenizer.json")
    ckpt = random_checkpoint(tmp_path / "rand", design_config(data, "d"), tok, seed=3)
    assert (ckpt / ROLES_FILE).is_file() and (ckpt / "tokenizer.json").is_file()
    shutil.rmtree(data)  # the export reads the checkpoint's copies
    chat = tmp_path / "chat"  # the same ids, another EOS: refused
    assert adopt_cli(tmp_path / "llm", chat, "--eos", "<|im_end|>").returncode == 0
    with pytest.raises(ConversionError, match=r"BOS/EOS <s> <\|im_end\|>, the checkpoint trained "
                                              r"with <s> <\|endoftext\|>"):
        export(ckpt, tmp_path / "hf", tokenizer=chat)
    assert main(["convert", "to-hf", str(ckpt), str(tmp_path / "hf")]) == 0
    assert "verify: ok" in capsys.readouterr().out
    eos = pre.token_to_id("<|endoftext|>")
    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == eos
    assert hf_tok("a red circle").input_ids[0] == tok.bos_id
    assert GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == eos
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["text_config"]["eos_token_id"] == eos


def test_a_run_refuses_a_data_tokenizer_that_moves_its_checkpoints_ids(small_dataset, tmp_path, caplog):
    """Resuming or starting from a checkpoint (`checkpoint.init_from`) with data.path's tokenizer
    giving the checkpoint's tokens other ids stops before the model is built; ids kept with
    tokens added after them train on; a changed EOS is said."""
    from hf_helpers import write_dataset_tokenizer

    from mmpretrain.config import ConfigError, load
    from mmpretrain.train.loop import train
    from mmpretrain.train.resume import check_tokenizer

    ckpt = tmp_path / "ckpt"
    saved = write_dataset_tokenizer(ckpt)  # a checkpoint's copy: all check_tokenizer reads
    check_tokenizer(ckpt, saved)
    grown = TextTokenizer.load(ckpt / "tokenizer.json")
    grown.tokenizer.add_tokens(["circle-ish", "squarely"])
    check_tokenizer(ckpt, grown)
    with pytest.raises(ConfigError, match=r"gives \d+ of the tokens of .*ckpt/tokenizer.json .* other ids"):
        check_tokenizer(ckpt, write_dataset_tokenizer(tmp_path / "other", vocab_size=320))
    qwen_like_tokenizer(tmp_path / "llm")
    assert adopt_cli(tmp_path / "llm", tmp_path / "a").returncode == 0
    assert adopt_cli(tmp_path / "llm", tmp_path / "b", "--eos", "<|im_end|>").returncode == 0
    check_tokenizer(tmp_path / "a", TextTokenizer.load(tmp_path / "b" / "tokenizer.json"))
    assert "end with <|im_end|>; the checkpoint trained with <s> and <|endoftext|>" in caplog.text

    data = tmp_path / "data"  # init_from a run of small_dataset, on data with another tokenizer
    shutil.copytree(small_dataset, data)
    random_checkpoint(tmp_path / "first", tiny_config(small_dataset), TextTokenizer.load(
        small_dataset / "tokenizer.json"))
    write_dataset_tokenizer(data.with_name("other2"), vocab_size=320).save(data / "tokenizer.json")
    cfg = load("jobs/tiny-d.yaml", [f"data.path={data}", f"checkpoint.init_from={tmp_path / 'first'}",
                                    "train.steps=1", "logging.tensorboard=false"])
    with pytest.raises(ConfigError, match="other ids"):
        train(cfg, tmp_path / "second")
    assert not (tmp_path / "second" / "checkpoints").exists() or not any(
        (tmp_path / "second" / "checkpoints").iterdir())
