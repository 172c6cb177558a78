"""RMSNorm whose decode-sized inputs go through one call of the project's native library (native/qvl_gemv.c
`qvl_rms_norm`): torch dispatches 8 ops for it (cast, pow, mean, add, rsqrt, mul, cast, mul; ~3 µs each on the
2-core VM, 113 norms a token for 28 layers: ~2.5 ms). Same rounding steps as norms.RMSNorm; only the order of the
sum of squares differs (NEAR, not bit-equal). Larger inputs, other devices and dtypes take RMSNorm's own path.
"""

from __future__ import annotations

from typing import Any

import torch

from qvl_pipeline.model.norms import RMSNorm
from qvl_plugins.kernels.native_gemv import NativeBuild, native_dtype_ok, rms_norm

MAX_ROWS = 64            # rows of `size` per call up to which the (single-threaded) native norm is used


class NativeRMSNorm(RMSNorm):
    """norms.RMSNorm (the same parameter, so checkpoints load) with the native path for decode-sized inputs."""

    def __init__(self, size: int, eps: float, build: NativeBuild) -> None:
        super().__init__(size, eps)
        self._build = build
        self._settle()

    def _settle(self) -> None:
        """Whether the weight's device and dtype admit the native path (decided when it is set, moved or cast)."""
        w = self.weight
        self._native = w.device.type == "cpu" and native_dtype_ok(w.dtype)

    def _apply(self, fn: Any, recurse: bool = True) -> NativeRMSNorm:
        super()._apply(fn, recurse)
        self._settle()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., size]
        if (self._native and x.numel() <= MAX_ROWS * x.shape[-1] and native_dtype_ok(x.dtype)
                and x.device.type == "cpu" and x.is_contiguous() and not torch.is_grad_enabled()):
            w = self.weight
            return rms_norm(self._build, x, w, self.eps, x.dtype if x.dtype == w.dtype else torch.float32)
        return super().forward(x)
