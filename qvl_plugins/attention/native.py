"""Attention whose decode step (one query position) on the CPU is one call into the project's native library
(native/qvl_gemv.c `qvl_decode_attention`); every other call is torch SDPA, as the sdpa plugin runs it.

Why: torch's CPU SDPA is slow for a single bf16 query. Measured on the 2-core AVX512-BF16 VM (torch 2.13, 16 q
heads over 8 kv heads, d 128): 65 / 217 / 449 / 1810 µs per layer for 32 / 128 / 256 / 1024 cached positions,
where fp32 takes 12 / 28 / 46 / 182 µs; at the benchmark's ~250 positions that was ~12 ms of a 2B decode step.
The native call reads each cached key and value once per query head in fp32 (fp32 scores, softmax and sums, the
result rounded once to the activations' dtype).
"""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity, NoOptions, RunFacts
from qvl_plugins.attention.sdpa import SdpaAttention
from qvl_plugins.kernels.native_gemv import NativeBuild, decode_attention, native_dtype_ok, native_for


class NativeDecodeAttention(SdpaAttention):
    fidelity = Fidelity.EXACT
    summary = ("torch SDPA, but a CPU decode step (one query position) is one call of the project's native "
               "library: fp32 softmax over the cache read once, instead of torch's slow single-query bf16 kernel")

    def __init__(self, facts: RunFacts, options: NoOptions | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self._build: NativeBuild = native_for(facts)

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        build = native_for(facts)
        return [] if build.available else [f"native library unavailable: {build.reason}"]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        # q [b, h, 1, d], k/v [b, kvh, n, d]: the decoded position is the last, so it sees every key (causal or not)
        if (q.shape[2] != 1 or q.device.type != "cpu" or not native_dtype_ok(q.dtype) or not (q.dtype == k.dtype
                == v.dtype) or k.device.type != "cpu" or v.device.type != "cpu" or k.stride(-1) != 1
                or v.stride(-1) != 1 or k.shape != v.shape or q.shape[1] % k.shape[1] or k.shape[2] == 0
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
            return super().attend(q, k, v, causal=causal, scale=scale)
        return decode_attention(self._build, q, k, v, scale)
