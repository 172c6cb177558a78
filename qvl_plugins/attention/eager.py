"""Reference attention: explicit matmul, additive mask, fp32 softmax — the oracle's eager path."""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.attention import AttentionBackend, causal_mask, repeat_kv_heads

# Score bytes (fp32) computed at a time: larger attention runs head by head, so the scores and probabilities stay in
# cache. The same ops on each head give the same bits; one 448x448 image (784 patches x 16 heads, bf16, 2 threads):
# 9 ms a layer head by head against 60-66 ms for all heads at once (39 MB of fp32 probabilities a pass).
SCORE_CHUNK_BYTES = 4 << 20


class EagerAttention(AttentionBackend):
    fidelity = Fidelity.REFERENCE
    summary = "matmul + fp32 softmax, the reference; runs anywhere"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        groups = q.shape[1] // k.shape[1]
        k = repeat_kv_heads(k, groups)
        v = repeat_kv_heads(v, groups)
        b, h, q_len, _ = q.shape
        allowed = causal_mask(q_len, k.shape[2], q.device) if causal else None
        step = max(1, SCORE_CHUNK_BYTES // max(1, b * q_len * k.shape[2] * 4))
        if step >= h:
            return attend_heads(q, k, v, allowed, scale)
        return torch.cat([attend_heads(q[:, i:i + step], k[:, i:i + step], v[:, i:i + step], allowed, scale)
                          for i in range(0, h, step)], dim=2)


def attend_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor | None,
                 scale: float) -> torch.Tensor:
    """q [b, h, q, d], k/v [b, h, kv, d] (heads already repeated), `allowed` [q, kv] or None -> [b, q, h, d]."""
    scores = torch.matmul(q, k.transpose(2, 3)) * scale              # [b, h, q, kv]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).transpose(1, 2).contiguous()       # [b, q, h, d]
