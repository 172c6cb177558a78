"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library, with the special tokens that
`tokenizer_config.json` declares."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Encoding
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.decoders import DecodeStream

from qvl_pipeline.checkpoint.jsonfile import read_json
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
        # A tokenizer.json may carry truncation/padding settings; applied here they would cut or pad every
        # prompt without a word (transformers turns them off too unless a call asks for them).
        backend.no_truncation()
        backend.no_padding()
        self._literal_lock = threading.Lock()
        self._special_pattern: re.Pattern[str] | None = None
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
        config: Any = {}
        config_path = base / TOKENIZER_CONFIG_FILE
        if config_path.is_file():
            config = read_json(config_path, _FIX)
            if not isinstance(config, dict):
                raise CheckpointError(f"{config_path} does not hold a JSON object", _FIX)
        try:
            return cls(backend, config)
        except (TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{config_path} has a malformed entry ({exc})", _FIX) from exc

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

    def special_token_strings(self) -> list[str]:
        """The texts of every token marked special (control tokens such as <|im_end|>), longest first."""
        tokens = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special and t.content}
        return sorted(tokens, key=lambda t: (-len(t), t))

    def special_token_pattern(self) -> re.Pattern[str]:
        """A regex matching any special token's text (longest alternative first); matches nothing if none."""
        if self._special_pattern is None:
            alternatives = "|".join(re.escape(t) for t in self.special_token_strings())
            self._special_pattern = re.compile(alternatives or r"(?!x)x")
        return self._special_pattern

    def encode(self, text: str, *, add_special_tokens: bool = True,
               plain: Sequence[tuple[int, int]] = ()) -> list[int]:
        """Ids of `text`. Special tokens written in the text become their ids, except where they overlap a
        `plain` span (start, end) of character offsets: there they are ordinary text (user-typed "<|im_end|>"
        becomes the tokens of those characters, not the control token)."""
        if not plain:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        encodings = [self._encode_piece(piece, special) for piece, special in self._split_special(text, plain)]
        merged = Encoding.merge(encodings, growing_offsets=True) if encodings else \
            self.backend.encode("", add_special_tokens=False)
        if add_special_tokens:
            merged = self.backend.post_process(merged, None, True)
        return merged.ids

    def _split_special(self, text: str, plain: Sequence[tuple[int, int]]) -> list[tuple[str, bool]]:
        """`text` cut into (piece, is_special) at the special tokens outside the `plain` spans. Whitespace next to
        a token declared lstrip/rstrip goes with the token, as the tokenizer's own matching does."""
        strip = {t.content: t for t in self.backend.get_added_tokens_decoder().values() if t.special}
        pieces: list[tuple[str, bool]] = []
        start = 0
        for match in self.special_token_pattern().finditer(text):
            if any(a < match.end() and match.start() < b for a, b in plain):
                continue
            before = text[start:match.start()]
            if strip[match.group()].lstrip:
                before = before.rstrip()
            pieces.append((before, False))
            pieces.append((match.group(), True))
            start = match.end()
            if strip[match.group()].rstrip:
                while start < len(text) and text[start].isspace():
                    start += 1
        pieces.append((text[start:], False))
        return [(piece, special) for piece, special in pieces if piece]

    def _encode_piece(self, piece: str, special: bool) -> Encoding:
        if special:
            return self.backend.encode(piece, add_special_tokens=False)
        with self._literal_lock:         # the switch is a property of the shared Rust tokenizer
            self.backend.encode_special_tokens = True
            try:
                return self.backend.encode(piece, add_special_tokens=False)
            finally:
                self.backend.encode_special_tokens = False

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = True) -> DecodeStream:
        """An incremental decoder: `stream.step(tokenizer.backend, id)` returns new text or None (for streaming)."""
        return DecodeStream(skip_special_tokens=skip_special_tokens)


# config.json's token-id fields and the tokenizer tokens they must be.
SPECIAL_TOKEN_FIELDS: dict[str, str] = {
    "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
    "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
}


def check_special_token_ids(tokenizer: Tokenizer, *, image_token_id: int, video_token_id: int,
                            vision_start_token_id: int, vision_end_token_id: int,
                            vocab_size: int | None = None) -> None:
    """Raise CheckpointError when config.json's vision token ids are not the tokenizer's ids of <|image_pad|>,
    <|video_pad|>, <|vision_start|>, <|vision_end|> (checked for each token the tokenizer has), or when the
    tokenizer produces ids past the model's `vocab_size` (its embedding could not look them up)."""
    given = {"image_token_id": image_token_id, "video_token_id": video_token_id,
             "vision_start_token_id": vision_start_token_id, "vision_end_token_id": vision_end_token_id}
    wrong = []
    for field, token in SPECIAL_TOKEN_FIELDS.items():
        actual = tokenizer.backend.token_to_id(token)
        if actual is not None and actual != given[field]:
            wrong.append((field, token, actual))
    if wrong:
        raise CheckpointError(
            "config.json's vision token ids do not match the tokenizer: " + "; ".join(
                f"{field}={given[field]} but the tokenizer's {token} is {actual}" for field, token, actual in wrong),
            "set " + ", ".join(f"{field}: {actual}" for field, _, actual in wrong) + " in config.json (or use the "
            "tokenizer that belongs to this model)")
    if vocab_size is not None and tokenizer.vocab_size > vocab_size:
        top = max(tokenizer.backend.get_vocab(with_added_tokens=True).values())
        if top >= vocab_size:
            raise CheckpointError(
                f"the tokenizer has ids up to {top} but config.json's text_config.vocab_size is {vocab_size}: "
                "the model's embedding has no row for the higher ids",
                "use the tokenizer.json that belongs to this model (or the config.json that matches it)")
