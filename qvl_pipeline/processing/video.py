"""Videos given as frame images → vision-encoder input and per-temporal-patch timestamps (Qwen3-VL rules)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing.image import VisionInputs
from qvl_pipeline.processing.image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageSource, load_image
from qvl_pipeline.processing.patchify import patchify
from qvl_pipeline.processing.pixels import BACKENDS, Backend, prepare_frames
from qvl_pipeline.processing.smart_resize import smart_resize_video
from qvl_pipeline.processing.vision_config import VisionPreprocessConfig, parse_vision_config, read_vision_config

# The reference assumes this frame rate when a clip comes without one (it warns).
DEFAULT_FPS = 24.0


@dataclass(frozen=True)
class VideoClip:
    """Frames already sampled from a video, with the rate and original indices that date them."""

    frames: Sequence[ImageSource]
    fps: float | None = None                      # frame rate of the source video; None → DEFAULT_FPS
    frame_indices: Sequence[int] | None = None    # index of each frame in the source; None → 0, 1, 2, ...


@dataclass(frozen=True)
class VideoInputs(VisionInputs):
    """VisionInputs of videos plus, per video, the time in seconds of each temporal patch."""

    timestamps: list[list[float]] = field(default_factory=list)

    def prompt_specs(self) -> list[tuple[list[float], int]]:
        """Per video, (timestamps, placeholder tokens per temporal patch) as `build_prompt(videos=...)` takes."""
        per_frame = [int(h * w) // self.merge_size**2 for _, h, w in self.grid_thw.tolist()]
        return list(zip(self.timestamps, per_frame, strict=True))


def frame_timestamps(indices: Sequence[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal patch: the mean time of its first and last frame (the last index is repeated
    to fill the final patch)."""
    padded = list(indices)
    if pad := -len(padded) % temporal_patch_size:
        padded += [padded[-1]] * pad
    seconds = [i / fps for i in padded]
    return [(seconds[i] + seconds[i + temporal_patch_size - 1]) / 2
            for i in range(0, len(seconds), temporal_patch_size)]


class VideoProcessor:
    """Turns frame lists into `VideoInputs`, with the numbers of a checkpoint's video preprocessor config.

    Every frame of a clip gets one size, chosen from the whole clip's pixel budget. `cap_pixels_per_frame`
    applies the per-frame cap of qwen-vl-utils (off by default, as in the reference).
    """

    def __init__(self, config: VisionPreprocessConfig | Mapping[str, Any], *, min_pixels: int | None = None,
                 max_pixels: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 backend: Backend = "torch", cap_pixels_per_frame: bool = False,
                 max_video_tokens: int = 768) -> None:
        if not isinstance(config, VisionPreprocessConfig):
            config = parse_vision_config(config, video=True)
        if backend not in BACKENDS:
            raise ValueError(f"unknown resize backend {backend!r}; use one of {BACKENDS}")
        self.config = config.with_pixels(min_pixels, max_pixels)
        self.max_image_pixels = max_image_pixels
        self.backend = backend
        self.cap_pixels_per_frame = cap_pixels_per_frame
        self.max_video_tokens = max_video_tokens

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> VideoProcessor:
        """The processor a checkpoint folder's video (else image) preprocessor config describes."""
        return cls(read_vision_config(folder, video=True), **overrides)

    def target_size(self, num_frames: int, height: int, width: int) -> tuple[int, int]:
        """(height, width) every frame of a clip of this shape is resized to."""
        c = self.config
        max_pixels = c.max_pixels
        if self.cap_pixels_per_frame:
            frame_cap = self.max_video_tokens * c.factor * c.factor
            per_frame = max(min(frame_cap, c.max_pixels // num_frames), int(c.min_pixels * 1.05))
            max_pixels = per_frame * num_frames
        return smart_resize_video(num_frames, height, width, c.factor, c.temporal_patch_size, c.min_pixels,
                                  max_pixels)

    def process_one(self, clip: VideoClip | Sequence[ImageSource]) -> tuple[torch.Tensor, tuple[int, int, int],
                                                                            list[float]]:
        """Patch rows, (t, h, w) grid and temporal-patch timestamps of one clip."""
        if not isinstance(clip, VideoClip):
            clip = VideoClip(frames=clip)
        sources = list(clip.frames)
        if not sources:
            raise InputError("a video needs at least one frame", "pass a non-empty list of frames")
        indices = list(clip.frame_indices) if clip.frame_indices is not None else list(range(len(sources)))
        if len(indices) != len(sources):
            raise InputError(f"{len(sources)} frames but {len(indices)} frame indices",
                             "pass one index per frame, or none")
        fps = float(clip.fps) if clip.fps else DEFAULT_FPS
        # Frames are decoded and resized one at a time: memory holds one full-size frame, not the whole clip.
        first = load_image(sources[0], self.max_image_pixels)
        height, width = first.height, first.width
        if self.config.do_resize:
            height, width = self.target_size(len(sources), height, width)
        elif height % self.config.factor or width % self.config.factor:
            raise InputError(f"frames of {width}×{height} pixels are not a multiple of {self.config.factor} and "
                             "the preprocessor config disables resizing", "resize the frames, or set do_resize to true")
        size = first.size
        resized = [prepare_frames([first], height, width, self.config, self.backend)]     # [1, C, H, W] each
        del first
        for number, source in enumerate(sources[1:], start=2):
            frame = load_image(source, self.max_image_pixels)
            if frame.size != size:
                raise InputError(f"the frames of a video differ in size: frame 1 is {size[0]}×{size[1]}, "
                                 f"frame {number} is {frame.width}×{frame.height}",
                                 "resize the frames to one size before passing them")
            resized.append(prepare_frames([frame], height, width, self.config, self.backend))
        pixels = torch.cat(resized)                                                            # [T, C, H, W]
        rows, grid = patchify(pixels, self.config.patch_size, self.config.merge_size,
                              self.config.temporal_patch_size)
        return rows, grid, frame_timestamps(indices, fps, self.config.temporal_patch_size)

    def __call__(self, clips: Sequence[VideoClip | Sequence[ImageSource]]) -> VideoInputs:
        """All clips' patch rows, concatenated in order, one grid row and one timestamp list per clip."""
        rows, grids, stamps = [], [], []
        for clip in clips:
            patches, grid, seconds = self.process_one(clip)
            rows.append(patches)
            grids.append(grid)
            stamps.append(seconds)
        patch_dim = 3 * self.config.temporal_patch_size * self.config.patch_size**2
        return VideoInputs(pixel_values=torch.cat(rows) if rows else torch.empty(0, patch_dim),
                           grid_thw=torch.tensor(grids, dtype=torch.long).reshape(-1, 3),
                           merge_size=self.config.merge_size, timestamps=stamps)
