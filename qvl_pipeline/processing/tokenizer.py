"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library, with the special tokens that
`tokenizer_config.json` declares."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

from qvl_pipeline.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
ROLE_TOKENS = ("bos_token", "eos_token", "pad_token", "unk_token")
_FIX = "download tokenizer.json and tokenizer_config.json again from the model's repository"


def _content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or a dict with "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text ↔ ids for one checkpoint, plus its special tokens."""

    def __init__(self, backend: RustTokenizer, config: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        config = config or {}
        self._add_declared_tokens(config.get("added_tokens_decoder") or {})
        self.special_tokens: dict[str, str | None] = {role: _content(config.get(role)) for role in ROLE_TOKENS}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        self.extra_special_tokens = [t for t in (_content(e) for e in extra) if t]
        declared = [t for t in (*self.special_tokens.values(), *self.extra_special_tokens) if t]
        unknown = [t for t in declared if self.backend.token_to_id(t) is None]
        if unknown:
            self.backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in unknown])

    def _add_declared_tokens(self, declared: Mapping[str, Any]) -> None:
        for key, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
            content = _content(entry)
            if content is None:
                continue
            current = self.backend.token_to_id(content)
            if current is None:
                token = AddedToken(content, special=bool(entry.get("special", True)),
                                   normalized=bool(entry.get("normalized", False)),
                                   lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                                   single_word=bool(entry.get("single_word", False)))
                self.backend.add_tokens([token])
                current = self.backend.token_to_id(content)
            if current != int(key):
                raise CheckpointError(f"{TOKENIZER_CONFIG_FILE} gives {content!r} id {key} but tokenizer.json "
                                      f"gives it {current}", _FIX)

    @classmethod
    def from_folder(cls, folder: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint folder (`tokenizer.json` + optional `tokenizer_config.json`)."""
        base = Path(folder)
        path = base / TOKENIZER_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint folder {base} has no {TOKENIZER_FILE}",
                                  f"copy {TOKENIZER_FILE} from the model's repository into the folder")
        try:
            backend = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a plain Exception for any parse error
            raise CheckpointError(f"{path} cannot be read as a tokenizer ({exc})", _FIX) from exc
        config: dict[str, Any] = {}
        config_path = base / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise CheckpointError(f"{config_path} is not valid JSON ({exc})", _FIX) from exc
        return cls(backend, config)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        """The id of `token`; CheckpointError if the vocabulary lacks it."""
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise CheckpointError(f"the tokenizer has no token {token!r}",
                                  "use the tokenizer that belongs to this model")
        return token_id

    def id_of(self, role: str) -> int | None:
        """The id of the token playing `role` ("eos_token", "pad_token", ...), if the config names one."""
        token = self.special_tokens.get(role)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def special_ids(self) -> set[int]:
        """Ids of every token marked special (skipped when decoding)."""
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    def template_variables(self) -> dict[str, str]:
        """The special tokens as chat templates see them (bos_token, eos_token, ...)."""
        variables = {role: token for role, token in self.special_tokens.items() if token is not None}
        if self.extra_special_tokens:
            variables["additional_special_tokens"] = list(self.extra_special_tokens)  # type: ignore[assignment]
        return variables

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Ids of `text`; special tokens written in the text become their ids."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder: `stream.step(tokenizer.backend, id)` returns new text or None (for streaming)."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)
