"""torch.nn.functional.scaled_dot_product_attention with whatever backend torch picks for the device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.attention import AttentionBackend, causal_mask, repeat_kv_heads


class SdpaAttention(AttentionBackend):
    fidelity = Fidelity.EXACT
    summary = "torch SDPA (fused CPU/CUDA kernels); exact up to summation order"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k = repeat_kv_heads(k, groups)
        v = repeat_kv_heads(v, groups)
        q_len, kv_len = q.shape[2], k.shape[2]
        mask = None
        is_causal = False
        if causal and q_len > 1:
            if q_len == kv_len:
                is_causal = True
            else:
                mask = causal_mask(q_len, kv_len, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
        return out.transpose(1, 2).contiguous()
