"""Images → vision-encoder input: load, smart-resize, normalise, patchify (pixel_values + grid_thw)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing.image_io import DEFAULT_MAX_IMAGE_PIXELS, ImageSource, load_image, to_rgb
from qvl_pipeline.processing.patchify import patchify
from qvl_pipeline.processing.pixels import BACKENDS, Backend, prepare_frames
from qvl_pipeline.processing.smart_resize import smart_resize
from qvl_pipeline.processing.vision_config import VisionPreprocessConfig, parse_vision_config, read_vision_config

__all__ = ["ImageProcessor", "VisionInputs", "load_image", "smart_resize", "to_rgb"]


@dataclass(frozen=True)
class VisionInputs:
    """Patch rows of one or more images (or videos) and their patch grids."""

    pixel_values: torch.Tensor   # [patches, C·T·P·P] float32
    grid_thw: torch.Tensor       # [items, 3] int64: temporal, height, width in patches
    merge_size: int

    def token_counts(self) -> list[int]:
        """Placeholder tokens each item takes in the prompt (t·h·w / merge²)."""
        return [int(t * h * w) // self.merge_size**2 for t, h, w in self.grid_thw.tolist()]


class ImageProcessor:
    """Turns images into `VisionInputs`, with the numbers of a checkpoint's preprocessor config.

    `min_pixels` / `max_pixels` override the config's budget (a hardware profile's cap); `max_image_pixels`
    refuses larger inputs before decoding; `backend` picks which reference resize to equal ("pil" or "torch").
    """

    def __init__(self, config: VisionPreprocessConfig | Mapping[str, Any], *, min_pixels: int | None = None,
                 max_pixels: int | None = None, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                 backend: Backend = "pil") -> None:
        if not isinstance(config, VisionPreprocessConfig):
            config = parse_vision_config(config)
        if backend not in BACKENDS:
            raise ValueError(f"unknown resize backend {backend!r}; use one of {BACKENDS}")
        self.config = config.with_pixels(min_pixels, max_pixels)
        self.max_image_pixels = max_image_pixels
        self.backend = backend

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> ImageProcessor:
        """The processor a checkpoint folder's `preprocessor_config.json` describes."""
        return cls(read_vision_config(folder), **overrides)

    @property
    def merge_size(self) -> int:
        return self.config.merge_size

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) an image of this size is resized to."""
        c = self.config
        return smart_resize(height, width, c.factor, c.min_pixels, c.max_pixels)

    def process_one(self, image: ImageSource) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """Patch rows [t·h·w, C·T·P·P] and the (1, h, w) grid of one image."""
        rgb = load_image(image, self.max_image_pixels)
        height, width = rgb.height, rgb.width
        if self.config.do_resize:
            height, width = self.target_size(height, width)
        elif height % self.config.factor or width % self.config.factor:
            raise InputError(f"image of {width}×{height} pixels is not a multiple of {self.config.factor} and the "
                             "preprocessor config disables resizing", "resize the image, or set do_resize to true")
        frames = prepare_frames([rgb], height, width, self.config, self.backend)  # [1, C, H, W]
        return patchify(frames, self.config.patch_size, self.config.merge_size, self.config.temporal_patch_size)

    def __call__(self, images: Sequence[ImageSource]) -> VisionInputs:
        """All images' patch rows, concatenated in order, and one grid row per image."""
        rows, grids = [], []
        for image in images:
            patches, grid = self.process_one(image)
            rows.append(patches)
            grids.append(grid)
        patch_dim = 3 * self.config.temporal_patch_size * self.config.patch_size**2
        pixel_values = torch.cat(rows) if rows else torch.empty(0, patch_dim)
        grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        return VisionInputs(pixel_values=pixel_values, grid_thw=grid_thw, merge_size=self.config.merge_size)
