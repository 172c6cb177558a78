"""Attention whose decode step (one query position) on the CPU is one call into the project's native library
(native/qvl_gemv.c `qvl_decode_attention`); every other call is torch SDPA, as the sdpa plugin runs it.

Why: one C call replaces torch's dispatch and its single-query bf16 kernel. Measured on the 2-core AVX512-BF16 VM
(torch 2.13, 16 q heads over 8 kv heads, d 128, one layer, bf16): 11 / 40 / 143 µs for 32 / 256 / 1024 cached
positions against 24 / 56 / 191 µs for the sdpa plugin's folded decode step (~0.5 ms a 2B token at 250
positions); in fp32 the two are about even. The native call reads each cached key and value once per kv head
(fp32 scores, softmax and sums, the result rounded once to the activations' dtype).
"""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity
from qvl_plugins.attention.sdpa import SdpaAttention
from qvl_plugins.kernels.native_gemv import UsesNativeLibrary, decode_attention, native_dtype_ok


class NativeDecodeAttention(UsesNativeLibrary, SdpaAttention):
    fidelity = Fidelity.EXACT
    summary = ("torch SDPA, but a CPU decode step (one query position) is one call of the project's native "
               "library: fp32 softmax over the cache read once, instead of torch's slow single-query bf16 kernel")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        # q [b, h, 1, d], k/v [b, kvh, n, d]: the decoded position is the last, so it sees every key (causal or not)
        if (q.shape[2] != 1 or q.device.type != "cpu" or not native_dtype_ok(q.dtype) or not (q.dtype == k.dtype
                == v.dtype) or k.device.type != "cpu" or v.device.type != "cpu" or k.stride(-1) != 1
                or v.stride(-1) != 1 or k.shape != v.shape or q.shape[1] % k.shape[1] or k.shape[2] == 0
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
            return super().attend(q, k, v, causal=causal, scale=scale)
        return decode_attention(self._build, q, k, v, scale)
