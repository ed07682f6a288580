"""The byte-level BPE tokenizer: fixed special ids, specials never split, no automatic BOS/EOS."""

from __future__ import annotations

import pytest
from mmpretrain.data.tokenizer import SPECIAL_TOKENS, TextTokenizer, train_tokenizer

CORPUS = [
    "a red circle at the top left and a blue square in the center.",
    "question: what color is the triangle? answer: green.",
    "question: how many shapes are there? answer: two.",
    "here are three pictures.",
    "the first picture shows an orange star on the right.",
    "in all there are five shapes.",
] * 20


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer(train_tokenizer(CORPUS, vocab_size=400))


def test_special_ids_are_fixed(tok):
    head = ["<pad>", "<s>", "</s>", "<unk>", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<image>"]
    assert SPECIAL_TOKENS[:8] == head
    assert SPECIAL_TOKENS[8:] == [f"<tile_{i}>" for i in range(1, 13)] + ["<tile_global_thumbnail>"]
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.token_id(name) == i
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.img_id, tok.img_break_id, tok.img_end_id, tok.image_marker_id) == (4, 5, 6, 7)
    assert tok.tile_id(1) == 8 and tok.tile_id(12) == 19 and tok.thumbnail_id == 20


def test_specials_never_split(tok):
    assert tok.encode("[IMG][IMG_BREAK]", specials=True) == [tok.img_id, tok.img_break_id]
    for name in SPECIAL_TOKENS:
        assert tok.encode(name, specials=True) == [SPECIAL_TOKENS.index(name)]
    ids = tok.encode("a red<tile_3>circle[IMG_END]", specials=True)
    assert tok.tile_id(3) in ids and ids[-1] == tok.img_end_id
    assert tok.decode(ids) == "a red<tile_3>circle[IMG_END]"


def test_special_strings_in_data_text_are_plain_text(tok, tmp_path):
    """A caption may say "[IMG]" or "<s>" (web text): that is text, never an image or control
    token, which only the sequence builder places."""
    text = "a <s> tag, [IMG]x[/IMG] and <tile_3></s><pad>"
    ids = tok.encode(text)
    assert not set(ids) & set(range(len(SPECIAL_TOKENS))) and tok.decode(ids) == text
    tok.save(tmp_path / "t.json")  # the setting does not stick to the saved file
    assert TextTokenizer.load(tmp_path / "t.json").encode("[IMG]", specials=True) == [tok.img_id]


def test_no_automatic_bos_eos(tok):
    assert tok.encode("") == []
    ids = tok.encode("a red circle at the top left.")
    assert all(i >= len(SPECIAL_TOKENS) for i in ids)


def test_roundtrip_any_text(tok):
    for text in CORPUS[:6] + ["Zürich ✓ 日本語\n\ttabs", "  leading spaces", "UPPER case 123"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([tok.img_id] + tok.encode(" hi"), skip_special=True) == " hi"


def test_merges_learned(tok):
    assert len(tok.encode("question: what color is the triangle?")) < 12
    assert 256 + len(SPECIAL_TOKENS) < tok.vocab_size <= 400


def test_save_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    back = TextTokenizer.load(path)
    assert back.vocab_size == tok.vocab_size
    for text in CORPUS[:6]:
        assert back.encode(text) == tok.encode(text)


def test_training_is_deterministic():
    a = train_tokenizer(CORPUS, vocab_size=350).to_str()
    b = train_tokenizer(CORPUS, vocab_size=350).to_str()
    assert a == b


def test_errors(tok):
    with pytest.raises(ValueError, match="<nope>"):
        tok.token_id("<nope>")
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
