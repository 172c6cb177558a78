"""torch SDPA forced to the memory-efficient (xFormers-style) CUDA kernel: sm_50+, Pascal included."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from qvl_pipeline.slots import RunFacts
from qvl_pipeline.slots.attention import AttentionBackend
from qvl_pipeline.slots.base import Fidelity, NoOptions, Plugin, SelfTestError
from qvl_pipeline.slots.checks import check_attention
from qvl_plugins.attention.cuda_sdpa import forced_sdpa


class SdpaMemEfficientAttention(AttentionBackend):
    fidelity = Fidelity.EXACT
    summary = ("torch SDPA forced to the memory-efficient CUDA kernel (fp32/fp16, no score matrix in memory); "
               "the best exact attention on Pascal sm_61, which has no FlashAttention")

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        hw = facts.hardware
        return hw.cuda_reasons((5, 0), "memory-efficient SDPA")

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        return forced_sdpa(q, k, v, causal=causal, scale=scale, backend=SDPBackend.EFFICIENT_ATTENTION)

    def self_test(self, reference: Plugin) -> None:
        if not torch.cuda.is_available():
            raise SelfTestError("needs CUDA, but this process cannot reach a CUDA device")
        check_attention(self, reference, "cuda", torch.float32)
        check_attention(self, reference, "cuda", torch.float16)
