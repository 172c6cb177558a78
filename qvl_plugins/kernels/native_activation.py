"""The MLP activation through the native library: GELU's tanh approximation (the vision tower's), in place.

A 2B vision MLP's [784, 4096] bf16 output, 2 threads on the AVX-512 dev VM: torch's gelu(approximate="tanh") 2.8 ms
(5.2 ms with ATen limited to AVX2), the native kernel (native/qvl_gemv.c `qvl_gelu_tanh`: the same formula in fp32,
in place, no new output tensor) 0.9 ms (1.9 ms in the AVX2 build); a 448² image's vision tower at opt=moderate
0.697 -> 0.654 s (medians of 5 alternated images).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qvl_pipeline.model.activations import TANH_GELU_NAMES
from qvl_plugins.kernels.native_gemv import NativeBuild, gelu_tanh_, native_dtype_ok
from qvl_plugins.kernels.scratch import recorded


class NativeTanhGelu:
    """gelu(x, approximate="tanh") in place through the native library for contiguous CPU bf16/fp32 tensors outside
    autograd; anything else through `fallback` (the reference)."""

    def __init__(self, build: NativeBuild, fallback: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self._build = build
        self._fallback = fallback

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and native_dtype_ok(x.dtype) and x.is_contiguous() and not recorded(x):
            return gelu_tanh_(self._build, x)
        return self._fallback(x)


def native_activation(build: NativeBuild, name: str,
                      fallback: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation `name` through the native library where it has one and the library builds, else `fallback`."""
    if build.available and name in TANH_GELU_NAMES:
        return NativeTanhGelu(build, fallback)
    return fallback
