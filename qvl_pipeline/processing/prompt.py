"""Prompt building: one user turn (images, videos, then text) through the chat template, each vision
placeholder expanded to its token count, then tokenised."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from qvl_pipeline.errors import InputError
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


def build_prompt(tokenizer: Tokenizer, template: ChatTemplate, text: str, *, image_tokens: Sequence[int] = (),
                 videos: Sequence[tuple[Sequence[float], int]] = (),
                 messages: Sequence[Mapping[str, Any]] | None = None,
                 keep_outer_video_markers: bool = False) -> Prompt:
    """Render one user turn (or the given `messages`) with add_generation_prompt=True, expand the vision
    placeholders and tokenise.

    `image_tokens[i]` is the token count of image i (`VisionInputs.token_counts()`); `videos[i]` is
    (timestamps, tokens per temporal patch) of clip i. See `expand_placeholders` for the video markers.
    """
    if messages is None:
        messages = user_message(text, len(image_tokens), len(videos))
    rendered = template.render(messages, add_generation_prompt=True, **tokenizer.template_variables())
    expanded = expand_placeholders(rendered, image_tokens, videos, keep_outer_video_markers=keep_outer_video_markers)
    bos = tokenizer.special_tokens.get("bos_token")
    ids = tokenizer.encode(expanded, add_special_tokens=not (bos and expanded.startswith(bos)))
    return Prompt(text=expanded, input_ids=ids)
