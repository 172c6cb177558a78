"""The numbers of image/video preprocessing, read from a checkpoint's `preprocessor_config.json`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from qvl_pipeline.checkpoint.jsonfile import read_json
from qvl_pipeline.errors import CheckpointError, ConfigError

IMAGE_CONFIG_FILE = "preprocessor_config.json"
VIDEO_CONFIG_FILE = "video_preprocessor_config.json"
BICUBIC = 3   # Pillow's resample code, the reference processor's default
# The most pixels a preprocessor config may ask an image (or a clip) to be resized to: 16× what the released
# Qwen3-VL configs allow (2**24). Larger values cannot be meant and would allocate tens of GB.
MAX_CONFIG_PIXELS = 2**28

# Defaults of the reference processor classes when a key is absent (the image one is Qwen2-VL's: patch 14,
# CLIP mean/std). A Qwen3-VL checkpoint's file sets patch 16 and mean = std = 0.5 explicitly.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_DEFAULTS: dict[str, Any] = {
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
    "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
}
VIDEO_DEFAULTS: dict[str, Any] = {
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5), "min_pixels": 128 * 32 * 32, "max_pixels": 32 * 32 * 768,
}


@dataclass(frozen=True)
class VisionPreprocessConfig:
    """Patch geometry, pixel budget and normalisation of the vision input."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    min_pixels: int
    max_pixels: int
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = BICUBIC

    @property
    def factor(self) -> int:
        """Side length in pixels of one merged visual token (patch · merge)."""
        return self.patch_size * self.merge_size

    def with_pixels(self, min_pixels: int | None = None, max_pixels: int | None = None) -> VisionPreprocessConfig:
        """A copy with the pixel budget overridden where a value is given. A cap below the config's own minimum
        lowers the minimum too (the cap is a memory guard); an explicit minimum over the maximum is an error."""
        low = self.min_pixels if min_pixels is None else int(min_pixels)
        high = self.max_pixels if max_pixels is None else int(max_pixels)
        if low > high:
            if min_pixels is not None:
                raise ConfigError(f"min_pixels={low} is larger than max_pixels={high}",
                                  "lower processing.min_pixels (or raise processing.max_pixels)")
            low = high
        return replace(self, min_pixels=low, max_pixels=high)

    def check_against(self, vision_config: Mapping[str, Any]) -> None:
        """Raise CheckpointError if the patch geometry differs from the model's `vision_config`."""
        pairs = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                 ("merge_size", "spatial_merge_size"))
        for ours, theirs in pairs:
            if theirs in vision_config and vision_config[theirs] != getattr(self, ours):
                raise CheckpointError(
                    f"{IMAGE_CONFIG_FILE} sets {ours}={getattr(self, ours)} but config.json's vision_config has "
                    f"{theirs}={vision_config[theirs]}",
                    f"restore the model's own {IMAGE_CONFIG_FILE} (and {VIDEO_CONFIG_FILE})")


def _pixels(raw: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[int, int]:
    """min/max pixels from either spelling: top-level min_pixels/max_pixels (which win, as in the reference)
    or size.shortest_edge/longest_edge (or size.min_pixels/max_pixels)."""
    size = raw.get("size") or {}
    lo = size.get("shortest_edge", size.get("min_pixels", defaults["min_pixels"]))
    hi = size.get("longest_edge", size.get("max_pixels", defaults["max_pixels"]))
    lo = raw["min_pixels"] if raw.get("min_pixels") is not None else lo
    hi = raw["max_pixels"] if raw.get("max_pixels") is not None else hi
    return int(lo), int(hi)


def _triple(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else (float(value),) * 3


def parse_vision_config(raw: Mapping[str, Any], *, video: bool = False) -> VisionPreprocessConfig:
    """A VisionPreprocessConfig from a preprocessor_config.json dict; absent keys take the reference defaults."""
    defaults = VIDEO_DEFAULTS if video else IMAGE_DEFAULTS
    try:
        lo, hi = _pixels(raw, defaults)
        config = VisionPreprocessConfig(
            patch_size=int(raw.get("patch_size") or defaults["patch_size"]),
            temporal_patch_size=int(raw.get("temporal_patch_size") or defaults["temporal_patch_size"]),
            merge_size=int(raw.get("merge_size") or defaults["merge_size"]),
            image_mean=_triple(raw.get("image_mean", defaults["image_mean"])),
            image_std=_triple(raw.get("image_std", defaults["image_std"])),
            min_pixels=lo, max_pixels=hi,
            rescale_factor=float(raw.get("rescale_factor", 1 / 255)),
            do_resize=bool(raw.get("do_resize", True)),
            do_rescale=bool(raw.get("do_rescale", True)),
            do_normalize=bool(raw.get("do_normalize", True)),
            resample=int(raw.get("resample", BICUBIC)),
        )
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"preprocessor config has a malformed value ({exc})",
                              f"restore the model's own {IMAGE_CONFIG_FILE}") from exc
    numbers = (*config.image_mean, *config.image_std, config.rescale_factor)
    if min(config.patch_size, config.temporal_patch_size, config.merge_size, config.min_pixels) < 1 \
            or config.max_pixels < config.factor ** 2 or 0.0 in config.image_std \
            or config.min_pixels > config.max_pixels or config.max_pixels > MAX_CONFIG_PIXELS \
            or not all(math.isfinite(n) for n in numbers):
        raise CheckpointError(f"preprocessor config has impossible values: {config}",
                              f"restore the model's own {IMAGE_CONFIG_FILE}")
    return config


def read_vision_config(folder: str | Path, *, video: bool = False) -> VisionPreprocessConfig:
    """The image (or video) preprocessing config of a checkpoint folder.

    For video, `video_preprocessor_config.json` is read when present, else `preprocessor_config.json`.
    """
    base = Path(folder)
    names = [VIDEO_CONFIG_FILE, IMAGE_CONFIG_FILE] if video else [IMAGE_CONFIG_FILE]
    for name in names:
        path = base / name
        if path.is_file():
            raw = read_json(path, f"restore {name} from the model's repository")
            if not isinstance(raw, dict):
                raise CheckpointError(f"{path} does not hold a JSON object", f"restore {name} from the model's "
                                      "repository")
            return parse_vision_config(raw, video=video)
    raise CheckpointError(f"checkpoint folder {base} has no {IMAGE_CONFIG_FILE}",
                          f"copy {IMAGE_CONFIG_FILE} from the model's repository into the folder")
