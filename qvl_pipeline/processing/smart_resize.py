"""Target sizes for the vision encoder: both sides a multiple of the merged-patch factor, area within budget."""

from __future__ import annotations

import math

from qvl_pipeline.errors import InputError

MAX_ASPECT_RATIO = 200


def _check_aspect(height: int, width: int) -> None:
    if min(height, width) < 1:
        raise InputError(f"image of {width}×{height} pixels has no area", "pass an image at least 1 pixel wide")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise InputError(
            f"image of {width}×{height} pixels has an aspect ratio of {ratio:.0f}:1, over the model's limit "
            f"of {MAX_ASPECT_RATIO}:1", "crop or pad the image to a less extreme shape")


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor`, scaled into [min_pixels, max_pixels], aspect kept.

    Same numbers as the reference `smart_resize`; an aspect ratio over 200 raises InputError.
    """
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) for every frame of a clip: the budget counts all frames (rounded to the temporal
    factor); sides smaller than `factor` are first scaled up. Same numbers as the Qwen3-VL video reference."""
    if num_frames < temporal_factor:
        raise InputError(f"a video needs at least {temporal_factor} frames (one temporal patch), got {num_frames}",
                         "pass more frames, or pass a single frame as an image")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    _check_aspect(height, width)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
