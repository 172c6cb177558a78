"""Attention whose CPU hot paths are calls into the project's native library (native/qvl_gemv.c): a decode step
(one query position) is `qvl_decode_attention`, and a bf16 prefill on an AVX512-BF16 CPU (the vision tower's
bidirectional attention, the decoder's causal one over grouped kv heads) is `qvl_prefill_attention`; every other
call is torch SDPA, as the sdpa plugin runs it.

Why, measured on the 2-core AVX512-BF16 VM (torch 2.13):
- decode (16 q heads over 8 kv heads, d 128, one layer, bf16): 11 / 40 / 143 µs for 32 / 256 / 1024 cached positions
  against 24 / 56 / 191 µs for the sdpa plugin's folded decode step (~0.5 ms a 2B token at 250 positions); in fp32
  the two are about even. The call reads each cached key and value once per kv head (fp32 scores, softmax and sums,
  the result rounded once to the activations' dtype). Over an int8 KV cache (`attend_int8`) the same call reads the
  int8 rows and widens each one into L1 as it goes, bit-equal to widening the cache first: 2B shapes, 28 layers,
  bf16, append + attention per token: 1.84 -> 1.49 / 3.38 -> 2.72 / 9.05 -> 7.61 ms at 64 / 250 / 1000 positions.
- vision (16 heads, d 64, one 448x448 image = 784 patches, one layer): ~5 ms against ~20 ms for torch's CPU flash
  kernel, most of whose time goes outside its GEMMs; 24 layers: ~0.35 s of a 2B time to first token. The call takes
  vdpbf16ps products with fp32 sums, an exact fp32 softmax over the whole row, p rounded to bf16 for p · v as
  torch's flash kernel does.
- decoder prefill (16 q heads over 8 kv heads, d 128, causal, one layer): 0.57 / 7.9 ms for 223 / 1000 prompt
  positions against 3.5 / 36.6 ms for torch's bf16 SDPA (the kv heads repeated), the same error against fp32
  attention (2.0e-3 / 2.7e-3 relative); key blocks past a block of queries' last position are skipped.
"""

from __future__ import annotations

from itertools import pairwise

import torch

from qvl_pipeline.slots import Fidelity, Int8Rows, Plugin, RunFacts
from qvl_pipeline.slots.checks import check_attention
from qvl_plugins.attention.sdpa import SdpaAttention
from qvl_plugins.kernels.native_gemv import (
    PREFILL_ATTENTION_MAX_DIM,
    UsesNativeLibrary,
    decode_attention,
    has_prefill_attention,
    native_dtype_ok,
    prefill_attention,
)


class NativeAttention(UsesNativeLibrary, SdpaAttention):
    fidelity = Fidelity.EXACT
    summary = ("torch SDPA, but a CPU decode step (one query position) is one call of the project's native "
               "library (fp32 softmax over the cache read once, instead of torch's slow single-query bf16 kernel), "
               "and so is a bf16 prefill on AVX512-BF16: the vision tower's and the decoder's causal one (~4-6x "
               "torch's CPU flash kernel)")

    def __init__(self, facts: RunFacts, options: object = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self._prefill = has_prefill_attention(self._build, tuple(facts.hardware.cpu.isa))

    def attend_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      *, scale: float) -> torch.Tensor:
        # q, k, v [heads, total, d] -> [total, heads, d]
        d = q.shape[-1]
        if (not self._prefill or not (q.dtype == k.dtype == v.dtype == torch.bfloat16)
                or not (q.device.type == k.device.type == v.device.type == "cpu") or q.shape != k.shape
                or k.shape != v.shape or q.shape[1] == 0 or d % 2 or d > PREFILL_ATTENTION_MAX_DIM
                or not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1)
                or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
            return super().attend_varlen(q, k, v, cu_seqlens, scale=scale)
        segments = [prefill_attention(self._build, q[:, start:end], k[:, start:end], v[:, start:end], scale)
                    for start, end in pairwise(cu_seqlens.tolist()) if end > start]
        return segments[0] if len(segments) == 1 else torch.cat(segments, dim=0)

    def self_test(self, reference: Plugin) -> None:
        super().self_test(reference)
        if self._prefill:
            check_attention(self, reference, dtype=torch.bfloat16)       # the bf16 path the vision tower takes

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        # q [b, h, s, d], k/v [b, kvh, n, d] -> [b, s, h, d]. A decode step (s = 1) is the last position, so it sees
        # every key (causal or not); a bf16 prefill on AVX512-BF16 takes the native prefill attention
        if q.shape[2] > 1 and self._prefill and _native_prefill(q, k, v):
            b, h, s, d = q.shape
            out = torch.empty(b, s, h, d, dtype=torch.bfloat16)
            for i in range(b):
                prefill_attention(self._build, q[i], k[i], v[i], scale, causal, out=out[i])
            return out
        if not (q.dtype == k.dtype == v.dtype and _native_decode_step(q, k, v)):
            return super().attend(q, k, v, causal=causal, scale=scale)
        return decode_attention(self._build, q, k, v, scale)

    def attend_int8(self, q: torch.Tensor, k: Int8Rows, v: Int8Rows, *, causal: bool, scale: float) -> torch.Tensor:
        # a CPU decode step straight over the int8 rows (bit-equal to widening them first, without writing the
        # widened cache out and reading it back); anything else through the widened rows
        if not (q.dtype == k.dtype == v.dtype and k.scale.dtype == v.scale.dtype == torch.float32
                and _native_decode_step(q, k.q, v.q)):
            return super().attend_int8(q, k, v, causal=causal, scale=scale)
        return decode_attention(self._build, q, k.q, v.q, scale, k.scale, v.scale)


def _grouped_cpu_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """What both native attentions need: q [b, h, s, d], k/v [b, kvh, n, d] alike on the CPU with contiguous last
    dimensions, whole GQA groups, no gradient wanted."""
    return (q.device.type == k.device.type == v.device.type == "cpu" and k.shape == v.shape
            and k.stride(-1) == v.stride(-1) == 1 and q.shape[1] % k.shape[1] == 0
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def _native_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether qvl_prefill_attention takes this prefill: grouped CPU rows, all bf16, one batch size, n ≥ s keys,
    q's last dimension contiguous, d even and at most PREFILL_ATTENTION_MAX_DIM."""
    d = q.shape[-1]
    return (_grouped_cpu_rows(q, k, v) and q.dtype == k.dtype == v.dtype == torch.bfloat16
            and q.shape[0] == k.shape[0] and k.shape[2] >= q.shape[2] and d == k.shape[-1] and d % 2 == 0
            and d <= PREFILL_ATTENTION_MAX_DIM and q.stride(-1) == 1)


def _native_decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether qvl_decode_attention takes this call: grouped CPU rows, one query position in bf16|fp32, at least one
    cached position."""
    return (q.shape[2] == 1 and _grouped_cpu_rows(q, k, v) and native_dtype_ok(q.dtype) and k.shape[2] > 0)
