"""Rotary with cached tables whose rotation of q and k runs as one call into the project's native library on the
CPU (native/qvl_gemv.c `qvl_rope`), bit-equal to the reference: each product and the sum rounded where torch
rounds them. A decode step otherwise dispatches ~20 small torch ops per layer for it (casts, halves, cat, muls, add;
~3 µs each on the 2-core VM, ~1.6 ms a token for 28 layers). Other devices and layouts take the cached plugin's
torch path.
"""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity
from qvl_plugins.kernels.native_gemv import UsesNativeLibrary, native_dtype_ok, rope
from qvl_plugins.rotary.cached import CachedRotary


class NativeRotary(UsesNativeLibrary, CachedRotary):
    fidelity = Fidelity.EXACT
    summary = ("cached cos/sin tables; on the CPU q and k are rotated in one call of the project's native library "
               "(bit-equal to the reference), instead of ~20 torch ops per layer and step")

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # q [b, h, s, d], k [b, kvh, s, d], cos/sin [b, 1, s, d]; the native call takes a decode step (s == 1) on
        # the CPU with everything contiguous in one dtype that is the working dtype
        work = torch.float32 if upcast else q.dtype
        if (q.shape[2] != 1 or q.dtype != work or q.device.type != "cpu" or not native_dtype_ok(work)
                or not (k.dtype == cos.dtype == sin.dtype == work) or cos.shape != sin.shape
                or cos.shape[0] != q.shape[0] or cos.shape[-1] != q.shape[-1] or cos.numel() != q.shape[0] * q.shape[-1]
                or not (q.is_contiguous() and k.is_contiguous() and cos.is_contiguous() and sin.is_contiguous())):
            return super().apply(q, k, cos, sin, upcast=upcast)
        return rope(self._build, q, k, cos, sin)
