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
        if q.shape[2] == 1 and groups > 1:
            return decode_step(q, k, v, scale)
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


def decode_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One query position (decode), the q heads sharing a kv head folded into its query rows: the same maths as
    repeating the kv heads, without copying the cache every step.
    q [b, h, 1, d], k/v [b, kvh, n, d] -> [b, 1, h, d]."""
    b, h, _, d = q.shape
    kvh = k.shape[1]
    folded = q.reshape(b, kvh, h // kvh, d)                                     # [b, kvh, groups, d]
    out = F.scaled_dot_product_attention(folded, k, v, scale=scale)            # [b, kvh, groups, d]
    return out.reshape(b, 1, h, d)
