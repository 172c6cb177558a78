"""Resize and normalise RGB frames, numerically equal to one of the two reference processor backends.

"pil":   Pillow resize on uint8, then ×rescale in float64 → float32, then (x − mean) / std in float32
         (the reference's Pillow backend; also what qwen-vl-utils does to images).
"torch": torch bicubic antialiased resize on uint8, then one fused (x − mean/rescale) / (std/rescale) in float32
         (the reference's torchvision backend, the only one its video processor has).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image

from qvl_pipeline.processing.vision_config import VisionPreprocessConfig

Backend = Literal["pil", "torch"]
BACKENDS: tuple[str, ...] = ("pil", "torch")


def _normalize_pil_style(chw: np.ndarray, config: VisionPreprocessConfig) -> np.ndarray:
    x = chw
    if config.do_rescale:
        x = (x.astype(np.float64) * config.rescale_factor).astype(np.float32)
    if config.do_normalize:
        x = x.astype(np.float32, copy=False)
        mean = np.asarray(config.image_mean, dtype=np.float32)[:, None, None]
        std = np.asarray(config.image_std, dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    return x.astype(np.float32, copy=False)


def _normalize_torch_style(frames: torch.Tensor, config: VisionPreprocessConfig) -> torch.Tensor:
    # frames: [T, C, H, W] uint8
    if config.do_normalize:
        mean, std = torch.tensor(config.image_mean), torch.tensor(config.image_std)
        if config.do_rescale:
            mean, std = mean * (1.0 / config.rescale_factor), std * (1.0 / config.rescale_factor)
        return (frames.to(torch.float32) - mean[:, None, None]) / std[:, None, None]
    if config.do_rescale:
        return frames * config.rescale_factor
    return frames.to(torch.float32)


# Pillow resample codes -> torch interpolate modes, as the reference's torchvision backend maps them.
_TORCH_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def resize_torch(frames: torch.Tensor, height: int, width: int, resample: int = 3) -> torch.Tensor:
    """Antialiased resize of uint8 frames [T, C, H, W] with torch's uint8 kernels (Pillow-style filter taps)."""
    if tuple(frames.shape[-2:]) == (height, width):
        return frames
    mode = _TORCH_MODES.get(resample)
    if mode is None:
        raise ValueError(f"resample code {resample} has no torch equivalent; use 0, 2 or 3, or the pil backend")
    if mode == "nearest":
        return torch.nn.functional.interpolate(frames, size=(height, width), mode=mode)
    return torch.nn.functional.interpolate(frames, size=(height, width), mode=mode, antialias=True,
                                           align_corners=False)


def prepare_frames(frames: Sequence[Image.Image], height: int, width: int, config: VisionPreprocessConfig,
                   backend: Backend) -> torch.Tensor:
    """RGB frames of one size → resized, rescaled, normalised float32 [T, C, height, width]."""
    if backend == "pil":
        out = []
        for frame in frames:
            if config.do_resize:
                frame = frame.resize((width, height), resample=config.resample)
            chw = np.asarray(frame).transpose(2, 0, 1)
            out.append(torch.from_numpy(_normalize_pil_style(chw, config)))
        return torch.stack(out)
    if backend == "torch":
        stacked = torch.from_numpy(np.stack([np.asarray(f) for f in frames])).permute(0, 3, 1, 2).contiguous()
        if config.do_resize:
            stacked = resize_torch(stacked, height, width, config.resample)
        return _normalize_torch_style(stacked, config)
    raise ValueError(f"unknown resize backend {backend!r}; use one of {BACKENDS}")
