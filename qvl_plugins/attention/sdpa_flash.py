"""torch SDPA forced to the FlashAttention-2 CUDA kernel: sm_80+, fp16/bf16 only."""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

from qvl_pipeline.slots import RunFacts
from qvl_pipeline.slots.attention import AttentionBackend
from qvl_pipeline.slots.base import Fidelity, NoOptions, Plugin, SelfTestError
from qvl_pipeline.slots.checks import check_attention
from qvl_plugins.attention.cuda_sdpa import forced_sdpa

HALF_DTYPES = (torch.float16, torch.bfloat16)


class SdpaFlashAttention(AttentionBackend):
    fidelity = Fidelity.EXACT
    summary = "torch SDPA forced to FlashAttention-2 (fp16/bf16, sm_80+); the fastest exact attention on Ampere+"

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        hw = facts.hardware
        reasons = hw.cuda_reasons((8, 0), "FlashAttention")
        if facts.model.stored_dtype == "float32":
            reasons.append("FlashAttention runs only in fp16/bf16; the weights are float32")
        return reasons

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        if q.dtype not in HALF_DTYPES:
            raise RuntimeError(f"FlashAttention runs only in fp16/bf16; got {q.dtype} activations "
                               f"(pick a kernels plugin with a half compute dtype, or another attention plugin)")
        return forced_sdpa(q, k, v, causal=causal, scale=scale, backend=SDPBackend.FLASH_ATTENTION)

    def self_test(self, reference: Plugin) -> None:
        if not torch.cuda.is_available():
            raise SelfTestError("needs CUDA, but this process cannot reach a CUDA device")
        check_attention(self, reference, "cuda", torch.float16)
        check_attention(self, reference, "cuda", torch.bfloat16)
