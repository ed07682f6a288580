"""Text tokenizer (Hugging Face `tokenizers`) with the project's special tokens.

A tokenizer trained here (`train_tokenizer`: byte-level BPE) gives the special tokens
(`specials.SPECIAL_TOKENS`) ids 0..len-1 in order. One adopted from a pretrained model
(`adopt_tokenizer`, `data tokenizer --from`) keeps every id it had, its own `<s>` or `[IMG]`
included, takes the special tokens it lacks after its last id, and may give the BOS/EOS roles to
the model's own tokens (`specials`). Either way they are never split and never inserted
automatically: `encode` returns exactly the ids of the text.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mmpretrain.data.specials import (
    ROLES,
    SPECIAL_TOKENS,
    check_roles,
    read_roles,
    roles_path,
    specials_of,
    trained_here,
    write_roles,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers


def train_tokenizer(texts: Iterable[str], vocab_size: int, progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`; the specials get ids 0.. in SPECIAL_TOKENS order.
    `progress`: the tokenizers library's progress bars (on a terminal)."""
    min_size = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size} is below the minimum {min_size} (specials + 256 bytes)")
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    for want, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != want:
            raise ValueError(f"special token {name!r} has id {tok.token_to_id(name)}, expected {want}")
    return tok


def adopt_tokenizer(pretrained: Tokenizer, roles: dict[str, str] | None = None
                    ) -> tuple[Tokenizer, list[str]]:
    """`pretrained` (a model's tokenizer.json) with the project's special tokens: every id it
    has stays, so a pretrained embedding reads the data's ids as the tokens it learned; the
    special tokens it lacks are added after its last id. `roles` names the model's own tokens
    for BOS/EOS (they must be in it); their defaults are then not added. Returns (tokenizer, the
    added ones)."""
    roles = check_roles(roles or {})
    lacking = [t for t in roles.values() if pretrained.token_to_id(t) is None]
    if lacking:
        raise ValueError(f"the pretrained tokenizer has no token {', '.join(map(repr, lacking))}")
    specials = specials_of(roles)
    added = [t for t in specials if pretrained.token_to_id(t) is None]
    pretrained.add_special_tokens(specials)  # present ones keep their ids, never split
    return pretrained, added


def _check_specials(tok: Tokenizer, roles: dict[str, str]) -> None:
    """Raise ValueError unless every special token is in the tokenizer."""
    missing = [t for t in specials_of(roles) if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"the tokenizer lacks the special tokens {', '.join(missing)} (a pretrained "
                         f"model's tokenizer gets them with `mmpretrain data tokenizer --from`)")


class TextTokenizer:
    """A byte-level BPE tokenizer with the project's special tokens at fixed ids."""

    def __init__(self, tokenizer: Tokenizer, roles: dict[str, str] | None = None) -> None:
        self.roles = check_roles(roles or {})  # the roles naming other tokens than ROLES's
        _check_specials(tokenizer, self.roles)
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, path: str | Path) -> TextTokenizer:
        """Load a tokenizer file (`tokenizer.json`) and its roles file (`roles_path`): an
        adopted tokenizer must have one, a tokenizer trained here may."""
        path = Path(path)
        tok, roles = Tokenizer.from_file(str(path)), {}
        if roles_path(path).is_file():
            roles = read_roles(roles_path(path))
        elif not trained_here(tok) and all(tok.token_to_id(t) is not None for t in SPECIAL_TOKENS
                                           if t not in ROLES.values()):
            raise ValueError(f"{path}: an adopted tokenizer (its special tokens are not at ids "
                             f"0..{len(SPECIAL_TOKENS) - 1}) without {roles_path(path).name}, which "
                             f"names its BOS/EOS: copy that file beside it (or write "
                             f'{{"bos": TOKEN, "eos": TOKEN}} there)')
        try:
            return cls(tok, roles)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> TextTokenizer:
        """Train a new tokenizer on `texts` (see `train_tokenizer`)."""
        return cls(train_tokenizer(texts, vocab_size))

    def save(self, path: str | Path) -> None:
        """Write the tokenizer file (`tokenizer.json`), and its roles file unless it was trained
        here with the default roles."""
        self.tokenizer.save(str(path))
        plain = not self.roles and trained_here(self.tokenizer)
        write_roles(path, None if plain else self.role_tokens)

    def encode(self, text: str, specials: bool = False) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added. A special token's string in the text (a
        caption that says "[IMG]", "<s>") is ordinary text unless `specials`: image and control
        tokens come only from the sequence builder."""
        self.tokenizer.encode_special_tokens = not specials
        try:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        finally:
            self.tokenizer.encode_special_tokens = False  # as loaded (and as saved)

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of `ids`; special tokens are written out unless `skip_special`."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_id(self, name: str) -> int:
        """Id of the special token `name`; ValueError naming it if it is not a special token."""
        if name not in SPECIAL_TOKENS:
            raise ValueError(f"{name!r} is not a special token (known: {', '.join(SPECIAL_TOKENS)})")
        tid = self.tokenizer.token_to_id(name)
        if tid is None:
            raise ValueError(f"special token {name!r} is missing from the tokenizer")
        return tid

    def tile_id(self, index: int) -> int:
        """Id of `<tile_{index}>` (1-based, up to specials.MAX_TILES)."""
        return self.token_id(f"<tile_{index}>")

    @property
    def pad_id(self) -> int:
        """Id of `<pad>`."""
        return self.token_id("<pad>")

    @property
    def specials(self) -> list[str]:
        """The special tokens, the roles' own in place of `<s>`/`</s>`."""
        return specials_of(self.roles)

    @property
    def bos_token(self) -> str:
        """The token every sample begins with (`<s>` unless the roles name another)."""
        return self.roles.get("bos", ROLES["bos"])

    @property
    def eos_token(self) -> str:
        """The token every sample ends with (`</s>` unless the roles name another)."""
        return self.roles.get("eos", ROLES["eos"])

    @property
    def role_tokens(self) -> dict[str, str]:
        """{"bos": token, "eos": token}, defaults included."""
        return {"bos": self.bos_token, "eos": self.eos_token}

    @property
    def bos_id(self) -> int:
        """Id of the BOS token."""
        return self.tokenizer.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int:
        """Id of the EOS token."""
        return self.tokenizer.token_to_id(self.eos_token)

    @property
    def img_id(self) -> int:
        """Id of `[IMG]`, the image placeholder token."""
        return self.token_id("[IMG]")

    @property
    def img_break_id(self) -> int:
        """Id of `[IMG_BREAK]`, the end of a row of image patches."""
        return self.token_id("[IMG_BREAK]")

    @property
    def img_end_id(self) -> int:
        """Id of `[IMG_END]`, the last token of an image."""
        return self.token_id("[IMG_END]")

    @property
    def image_marker_id(self) -> int:
        """Id of `<image>`, the one-token image marker of the cross-attention design."""
        return self.token_id("<image>")

    @property
    def thumbnail_id(self) -> int:
        """Id of `<tile_global_thumbnail>`."""
        return self.token_id("<tile_global_thumbnail>")


def id_changes(ours: Tokenizer, other: Tokenizer) -> int:
    """How many of `ours`'s tokens `other` lacks or gives another id."""
    theirs = other.get_vocab(with_added_tokens=True)
    return sum(theirs.get(t) != i for t, i in ours.get_vocab(with_added_tokens=True).items())
