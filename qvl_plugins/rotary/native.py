"""Rotary with cached tables whose rotation of q and k runs as one call into the project's native library on the
CPU (native/qvl_gemv.c `qvl_rope_rows`), bit-equal to the cached plugin's torch path: in the activations' dtype with
each product and the sum rounded where torch rounds them (the decoder), or in fp32 rounded once (upcast: the vision
tower). A decode step otherwise dispatches ~20 small torch ops per layer for it (casts, halves, cat, muls, add;
~3 µs each on the 2-core VM, ~1.6 ms a token for 28 layers); the vision tower's upcast rotation of a 448² image
(784 patches, 16 heads, d 64) takes torch ~2-4 ms a layer in fp32 copies. Other devices, dtypes and layouts take
the cached plugin's torch path.
"""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity
from qvl_plugins.kernels.native_gemv import ELEM_MAX, UsesNativeLibrary, native_dtype_ok, rope
from qvl_plugins.rotary.cached import CachedRotary


class NativeRotary(UsesNativeLibrary, CachedRotary):
    fidelity = Fidelity.EXACT
    summary = ("cached cos/sin tables; on the CPU q and k are rotated in one call of the project's native library "
               "(bit-equal to the reference), instead of ~20 torch ops per layer and step, and the vision tower's "
               "fp32 rotation without its fp32 copies")

    def apply(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
              upcast: bool) -> tuple[torch.Tensor, torch.Tensor]:
        # vision: q [n, h, d], k [n, h, d], cos/sin [n, 1, d]; decoder: q [b, h, s, d], k [b, kvh, s, d],
        # cos/sin [b, 1, s, d]. The native call takes them as token rows (batch 1 for the decoder).
        rows = _token_rows(q, k, cos, sin, torch.float32 if upcast else q.dtype)
        if rows is None:
            return super().apply(q, k, cos, sin, upcast=upcast)
        qo, ko = rope(self._build, *rows, upcast)                       # [tokens, h, d] each
        return (qo, ko) if q.dim() == 3 else (qo.transpose(0, 1)[None], ko.transpose(0, 1)[None])


def _token_rows(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                work: torch.dtype) -> tuple[torch.Tensor, ...] | None:
    """q, k as [tokens, heads, d] views and cos, sin as [tokens, d] views for qvl_rope_rows, or None where it does
    not take them (another device or dtype, tables not in the working dtype or not contiguous, batch > 1)."""
    d = q.shape[-1]
    if not (q.device.type == k.device.type == cos.device.type == "cpu" and native_dtype_ok(q.dtype)
            and k.dtype == q.dtype and cos.dtype == sin.dtype == work and cos.shape == sin.shape
            and cos.is_contiguous() and sin.is_contiguous() and k.shape[-1] == cos.shape[-1] == d
            and d % 2 == 0 and d <= ELEM_MAX and q.stride(-1) == k.stride(-1) == 1):
        return None
    if q.dim() == 3 and k.dim() == 3 and cos.shape == (q.shape[0], 1, d) and k.shape[0] == q.shape[0]:
        return q, k, cos.view(-1, d), sin.view(-1, d)
    if (q.dim() == 4 and k.dim() == 4 and q.shape[0] == k.shape[0] == 1 and k.shape[2] == q.shape[2]
            and cos.shape == (1, 1, q.shape[2], d)):
        return q[0].transpose(0, 1), k[0].transpose(0, 1), cos.view(-1, d), sin.view(-1, d)
    return None
