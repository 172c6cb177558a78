"""One request (text, images, videos) → everything the model's prefill takes, from a checkpoint folder's assets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from qvl_pipeline.processing.chat_template import ChatTemplate
from qvl_pipeline.processing.image import ImageProcessor, VisionInputs
from qvl_pipeline.processing.image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageSource
from qvl_pipeline.processing.prompt import IMAGE_TOKEN, VIDEO_TOKEN, build_prompt
from qvl_pipeline.processing.stop_tokens import read_generation_config, stop_token_ids
from qvl_pipeline.processing.tokenizer import Tokenizer
from qvl_pipeline.processing.video import VideoClip, VideoInputs, VideoProcessor

TEXT, IMAGE, VIDEO = 0, 1, 2   # token types, as the reference's mm_token_type_ids


@dataclass(frozen=True)
class ProcessedRequest:
    """Prompt ids and vision inputs of one request."""

    text: str
    input_ids: torch.Tensor            # [1, seq] int64
    mm_token_type_ids: torch.Tensor    # [1, seq] int64: 0 text, 1 image pad, 2 video pad
    images: VisionInputs | None
    videos: VideoInputs | None


class RequestProcessor:
    """Tokenizer, chat template and image/video processors of one checkpoint, applied together."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate, images: ImageProcessor,
                 videos: VideoProcessor | None = None, stop_ids: Sequence[int] = ()) -> None:
        self.tokenizer, self.template, self.image_processor, self.video_processor = tokenizer, template, images, videos
        self.stop_ids = list(stop_ids)
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.video_token_id = tokenizer.token_to_id(VIDEO_TOKEN)

    @classmethod
    def from_folder(cls, folder: str | Path, *, min_pixels: int | None = None, max_pixels: int | None = None,
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> RequestProcessor:
        """Everything a checkpoint folder ships for input processing; the pixel budget may be overridden."""
        tokenizer = Tokenizer.from_folder(folder)
        limits = {"min_pixels": min_pixels, "max_pixels": max_pixels, "max_image_pixels": max_image_pixels}
        return cls(tokenizer, ChatTemplate.from_folder(folder), ImageProcessor.from_folder(folder, **limits),
                   VideoProcessor.from_folder(folder, **limits),
                   stop_token_ids(read_generation_config(folder), tokenizer))

    def __call__(self, text: str, images: Sequence[ImageSource] = (),
                 videos: Sequence[VideoClip | Sequence[ImageSource]] = (), *,
                 allow_special_tokens: bool = False) -> ProcessedRequest:
        """One user turn: the images, then the videos, then the text (special tokens typed in it stay text
        unless `allow_special_tokens`; see `build_prompt`)."""
        vision = self.image_processor(images) if images else None
        clips = None
        if videos:
            if self.video_processor is None:
                raise ValueError("this RequestProcessor was built without a video processor")
            clips = self.video_processor(videos)
        video_specs = clips.prompt_specs() if clips is not None else []
        prompt = build_prompt(self.tokenizer, self.template, text,
                              image_tokens=vision.token_counts() if vision else (), videos=video_specs,
                              allow_special_tokens=allow_special_tokens)
        ids = torch.tensor([prompt.input_ids], dtype=torch.long)
        types = torch.zeros_like(ids)
        types[ids == self.image_token_id] = IMAGE
        types[ids == self.video_token_id] = VIDEO
        return ProcessedRequest(text=prompt.text, input_ids=ids, mm_token_type_ids=types, images=vision,
                                videos=clips)
