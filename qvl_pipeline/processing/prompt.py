"""Prompt building: one user turn (images, videos, then text) through the chat template, each vision
placeholder expanded to its token count, then tokenised."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qvl_pipeline.errors import CheckpointError, InputError
from qvl_pipeline.processing.chat_template import ChatTemplate
from qvl_pipeline.processing.tokenizer import Tokenizer

IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"


@dataclass(frozen=True)
class Prompt:
    """The rendered, expanded prompt and its ids."""

    text: str
    input_ids: list[int]


def user_message(text: str, num_images: int = 0, num_videos: int = 0) -> list[dict[str, Any]]:
    """A one-turn conversation in HF message format: images first, then videos, then the text."""
    content: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    content += [{"type": "video"} for _ in range(num_videos)]
    content.append({"type": "text", "text": text})
    return [{"role": "user", "content": content}]


def video_placeholder(timestamps: Sequence[float], tokens_per_frame: int) -> str:
    """One clip's text: per temporal patch, "<t seconds>" then vision_start, the pads, vision_end."""
    return "".join(f"<{t:.1f} seconds>{VISION_START}{VIDEO_TOKEN * tokens_per_frame}{VISION_END}"
                   for t in timestamps)


def expand_placeholders(text: str, image_tokens: Sequence[int] = (),
                        videos: Sequence[tuple[Sequence[float], int]] = (), *,
                        keep_outer_video_markers: bool = False) -> str:
    """Replace the i-th image pad by image_tokens[i] pads, and the i-th video's
    `<|vision_start|><|video_pad|><|vision_end|>` (or bare video pad) by its per-frame placeholder.

    `videos` holds (timestamps, tokens per temporal patch) per clip. The counts must match the text's pads.
    `keep_outer_video_markers` replaces only the video pad, leaving the template's own vision_start/end around
    the per-frame placeholders, as transformers 5.x's processor does; the Qwen format (the default, and
    transformers 4.57's) replaces the whole triple.
    """
    alternatives = [re.escape(VIDEO_TOKEN), re.escape(IMAGE_TOKEN)]
    if not keep_outer_video_markers:
        alternatives.insert(0, re.escape(VISION_START + VIDEO_TOKEN + VISION_END))
    pattern = re.compile("|".join(alternatives))
    image_iter, video_iter = iter(image_tokens), iter(videos)
    found = {"image": 0, "video": 0}

    def replace(match: re.Match[str]) -> str:
        kind = "image" if match.group() == IMAGE_TOKEN else "video"
        found[kind] += 1
        if kind == "image":
            count = next(image_iter, None)
            return IMAGE_TOKEN * count if count is not None else match.group()
        clip = next(video_iter, None)
        return video_placeholder(*clip) if clip is not None else match.group()

    expanded = pattern.sub(replace, text)
    if found["image"] != len(image_tokens) or found["video"] != len(videos):
        raise InputError(
            f"the prompt has {found['image']} image and {found['video']} video placeholder(s) but "
            f"{len(image_tokens)} image(s) and {len(videos)} video(s) were given",
            "pass one image per image placeholder (the chat template writes one per image)")
    return expanded


# Candidates for the mark that tags user-typed special tokens while the template renders: private-use
# characters, the first one that occurs nowhere in the template or the conversation is taken.
_MARKS = range(0xF0000, 0xF1000)
# Lone surrogates: what Python makes of bytes that are not UTF-8 (argv and files read with surrogateescape).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string inside a message structure, with a description of where it sits."""
    if isinstance(value, str):
        yield value, where
    elif isinstance(value, (bytes, bytearray)):
        raise InputError(f"{where} is bytes, not text", "decode it to str first (for example data.decode('utf-8'))")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, where if key in ("content", "text") else f"{where}, field {key!r}")
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item, where)


def check_prompt_text(messages: Sequence[Mapping[str, Any]], *, single_turn: bool = False) -> None:
    """Raise InputError for text the model must not be given: a lone surrogate (text that was not valid UTF-8),
    or a literal image/video placeholder token (it would desynchronise placeholders and image features)."""
    for index, message in enumerate(messages):
        role = message.get("role", "?") if isinstance(message, Mapping) else "?"
        where = "the prompt" if single_turn else f"message {index + 1} ({role})"
        for text, place in _strings(message, where):
            bad = _SURROGATE.search(text)
            if bad:
                code = ord(bad.group())
                what = (f"the byte 0x{code - 0xDC00:02x}, which is not valid UTF-8" if 0xDC80 <= code <= 0xDCFF
                        else f"a lone surrogate U+{code:04X}")
                raise InputError(f"{place} has an invalid character at position {bad.start()}: {what}",
                                 "pass UTF-8 text (re-save the text or file as UTF-8, or set the terminal to UTF-8)")
            for token, kind in ((IMAGE_TOKEN, "image"), (VIDEO_TOKEN, "video")):
                at = text.find(token)
                if at >= 0:
                    raise InputError(
                        f"{place} contains the {kind} placeholder token {token} (at position {at}); it would "
                        f"not match the {kind}s given",
                        f"remove {token} from the text and pass {kind}s with {kind}=... (the chat template writes "
                        f"one placeholder per {kind})")


def _free_mark(template: ChatTemplate, texts: Sequence[str]) -> str:
    for code in _MARKS:
        mark = chr(code)
        if mark not in template.source and not any(mark in t for t in texts):
            return mark
    raise InputError("the conversation uses every private-use character the prompt builder could mark user text "
                     "with", "remove private-use characters (U+F0000..U+F0FFF) from the text")


def _mark_specials(value: Any, pattern: re.Pattern[str], mark: str) -> Any:
    """A copy of a message structure with `mark` put before every special token written in its strings."""
    if isinstance(value, str):
        return pattern.sub(lambda m: mark + m.group(), value)
    if isinstance(value, Mapping):
        return {key: _mark_specials(item, pattern, mark) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark_specials(item, pattern, mark) for item in value]
    return value


def _unmark(text: str, mark: str, pattern: re.Pattern[str]) -> tuple[str, list[tuple[int, int]]]:
    """The text without marks, and the character spans of the special tokens that were marked (user-typed)."""
    pieces = text.split(mark)
    spans: list[tuple[int, int]] = []
    length = len(pieces[0])
    for piece in pieces[1:]:
        match = pattern.match(piece)
        if match:
            spans.append((length, length + match.end()))
        length += len(piece)
    return "".join(pieces), spans


def build_prompt(tokenizer: Tokenizer, template: ChatTemplate, text: str, *, image_tokens: Sequence[int] = (),
                 videos: Sequence[tuple[Sequence[float], int]] = (),
                 messages: Sequence[Mapping[str, Any]] | None = None,
                 keep_outer_video_markers: bool = False, allow_special_tokens: bool = False) -> Prompt:
    """Render one user turn (or the given `messages`) with add_generation_prompt=True, expand the vision
    placeholders and tokenise.

    `image_tokens[i]` is the token count of image i (`VisionInputs.token_counts()`); `videos[i]` is
    (timestamps, tokens per temporal patch) of clip i. See `expand_placeholders` for the video markers.
    Text in the messages is data: a special token typed in it (<|im_end|>, <|im_start|>...) is tokenised as
    plain text, and only the tokens the template itself writes are control tokens. `allow_special_tokens=True`
    restores the old behaviour (typed special tokens become control tokens). Either way, text holding a literal
    image/video placeholder token, or characters that were not valid UTF-8, raises InputError.
    """
    single_turn = messages is None
    if not isinstance(text, str) and (single_turn or text is not None):
        raise InputError(f"the prompt must be text (str), not {type(text).__name__}",
                         "pass the prompt as a str (decode bytes first)")
    if messages is None:
        messages = user_message(text, len(image_tokens), len(videos))
    check_prompt_text(messages, single_turn=single_turn)
    pattern = tokenizer.special_token_pattern()
    mark = None
    if not allow_special_tokens:
        mark = _free_mark(template, [t for t, _ in _strings(list(messages), "")])
        messages = _mark_specials(list(messages), pattern, mark)
    rendered = template.render(messages, add_generation_prompt=True, **tokenizer.template_variables())
    if not rendered.replace(mark or "", "").strip():
        raise CheckpointError(f"chat template {template.origin} rendered an empty prompt for this conversation",
                              "use the chat template from the model's repository; this one writes nothing for a "
                              "user turn")
    expanded = expand_placeholders(rendered, image_tokens, videos, keep_outer_video_markers=keep_outer_video_markers)
    plain: list[tuple[int, int]] = []
    if mark is not None:
        expanded, plain = _unmark(expanded, mark, pattern)
    bos = tokenizer.special_tokens.get("bos_token")
    ids = tokenizer.encode(expanded, add_special_tokens=not (bos and expanded.startswith(bos)), plain=plain)
    return Prompt(text=expanded, input_ids=ids)
