"""Reference attention: explicit matmul, additive mask, fp32 softmax — the oracle's eager path."""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.attention import AttentionBackend, causal_mask, repeat_kv_heads


class EagerAttention(AttentionBackend):
    fidelity = Fidelity.REFERENCE
    summary = "matmul + fp32 softmax, the reference; runs anywhere"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k = repeat_kv_heads(k, groups)
        v = repeat_kv_heads(v, groups)
        scores = torch.matmul(q, k.transpose(2, 3)) * scale          # [b, h, q, kv]
        if causal:
            allowed = causal_mask(q.shape[2], k.shape[2], q.device)
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v).transpose(1, 2).contiguous()   # [b, q, h, d]
