"""The project's special tokens, and the tokens a tokenizer gives the BOS and EOS roles.

Every sample begins with the BOS token and ends with the EOS token: `<s>` and `</s>` for a
tokenizer trained here (the special tokens at ids 0..len(SPECIAL_TOKENS)-1). A tokenizer adopted
from a pretrained model (`data tokenizer --from`) gives the roles to the model's own tokens where
it names them (a Qwen model: EOS `<|endoftext|>`), so their pretrained rows, not new ones, end
each sample, and generation stops where the model learned to. Its roles file, named after the
tokenizer file (`tokenizer.json` -> `tokenizer_roles.json`), says which: `{"bos": "<s>", "eos":
"<|endoftext|>"}`; an adopted tokenizer is not loaded without it.
"""
from __future__ import annotations

import json
from pathlib import Path

MAX_TILES = 12

SPECIAL_TOKENS: list[str] = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    "[IMG]",
    "[IMG_BREAK]",
    "[IMG_END]",
    "<image>",
    *[f"<tile_{i}>" for i in range(1, MAX_TILES + 1)],
    "<tile_global_thumbnail>",
]

ROLES = {"bos": "<s>", "eos": "</s>"}  # the default token of each role
ROLES_FILE = "tokenizer_roles.json"  # the roles file of tokenizer.json


def roles_path(tokenizer_path: str | Path) -> Path:
    """The roles file of a tokenizer file: `NAME.json` -> `NAME_roles.json` beside it."""
    path = Path(tokenizer_path)
    return path.with_name(f"{path.stem}_roles.json")


def trained_here(tok) -> bool:
    """Whether `tok` (a `tokenizers.Tokenizer`) has the special tokens at ids 0.. in order, as
    `train_tokenizer` makes them."""
    return all(tok.token_to_id(t) == i for i, t in enumerate(SPECIAL_TOKENS))


def specials_of(roles: dict[str, str]) -> list[str]:
    """The special tokens a tokenizer with `roles` ({role: token}) has: SPECIAL_TOKENS with each
    role's default replaced by the token named for it."""
    named = {ROLES[r]: t for r, t in roles.items()}
    return list(dict.fromkeys(named.get(t, t) for t in SPECIAL_TOKENS))


def check_roles(roles: dict[str, str]) -> dict[str, str]:
    """`roles` without its defaults; ValueError for an unknown role or a token with another use."""
    unknown = sorted(set(roles) - set(ROLES))
    if unknown:
        raise ValueError(f"unknown token roles {', '.join(unknown)} (known: {', '.join(ROLES)})")
    others = set(SPECIAL_TOKENS) - set(ROLES.values())
    taken = {r: t for r, t in roles.items() if t in others}
    if taken:
        raise ValueError(f"token roles {taken}: those tokens have their own use (padding, images)")
    return {r: t for r, t in roles.items() if t != ROLES[r]}


def read_roles(path: Path) -> dict[str, str]:
    """The roles a roles file holds; ValueError naming the file when it is not {role: token}."""
    try:
        roles = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(roles, dict) or not all(isinstance(t, str) for t in roles.values()):
        raise ValueError(f'{path}: expected {{"bos": TOKEN, "eos": TOKEN}}, got {roles!r}')
    return roles


def write_roles(tokenizer_path: str | Path, roles: dict[str, str] | None) -> None:
    """The roles file of `tokenizer_path` with `roles`; with None, none (a stale one removed)."""
    path = roles_path(tokenizer_path)
    if roles is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(roles, indent=2) + "\n")
    tmp.replace(path)


def _named(value) -> str | None:
    """A token as transformers' files spell it: a string, or an AddedToken's {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        fields = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    return fields if isinstance(fields, dict) else {}


def model_roles(model_dir: str | Path, tok=None) -> dict[str, str]:
    """{"bos": token, "eos": token} a pretrained model's files name. Each role from the first
    that has its key: tokenizer_config.json's `bos_token`/`eos_token` (null: the model has none,
    as Qwen's BOS), special_tokens_map.json's, then generation_config.json's and config.json's
    `bos_token_id`/`eos_token_id` read through `tok` (a `tokenizers.Tokenizer`). A role no file
    names is left out."""
    model_dir = Path(model_dir)
    by_name = [_json(model_dir / f) for f in ("tokenizer_config.json", "special_tokens_map.json")]
    by_id = [_json(model_dir / f) for f in ("generation_config.json", "config.json")]
    roles = {}
    for role in ROLES:
        found = [_named(f[f"{role}_token"]) for f in by_name if f"{role}_token" in f]
        if not found and tok is not None:
            ids = [f[f"{role}_token_id"] for f in by_id if f.get(f"{role}_token_id") is not None]
            ids = [i[0] if isinstance(i, list) and i else i for i in ids]  # an EOS list: its first
            found = [tok.id_to_token(i) for i in ids if isinstance(i, int)]
        if found and found[0]:
            roles[role] = found[0]
    return roles
