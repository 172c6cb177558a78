"""Exact attention over blocks of keys with a running (online) softmax: the score matrix never holds more than
block_size keys per query, whatever the context length."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl_pipeline.slots import AttentionBackend, Fidelity, RunFacts
from qvl_pipeline.slots.attention import causal_mask, repeat_kv_heads


@dataclass(frozen=True)
class OnlineSoftmaxOptions:
    block_size: int = 512        # keys per block: scores take q_len × block_size × 4 bytes per head

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be a positive key count, got {self.block_size}")


class OnlineSoftmaxAttention(AttentionBackend):
    fidelity = Fidelity.EXACT
    summary = "example plugin: exact attention over key blocks with an online softmax (bounded score memory)"
    Options = OnlineSoftmaxOptions

    @classmethod
    def validate(cls, facts: RunFacts, options: OnlineSoftmaxOptions) -> list[str]:
        # Runs on any device; a real plugin would say here why it cannot (ISA, GPU, model shape ...).
        if facts.model.config.text.head_dim > 256:
            return [f"head_dim {facts.model.config.text.head_dim} > 256 is not supported by this example"]
        return []

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        # q: [b, h, q_len, d]; k, v: [b, kv_h, kv_len, d] -> [b, q_len, h, d]
        groups = q.shape[1] // k.shape[1]
        k, v = repeat_kv_heads(k, groups), repeat_kv_heads(v, groups)
        q_len, kv_len = q.shape[2], k.shape[2]
        qf = q.float() * scale
        best = torch.full((*q.shape[:3], 1), float("-inf"), device=q.device)         # running max [b, h, q, 1]
        total = torch.zeros_like(best)                                                  # running sum of exp
        acc = torch.zeros((*q.shape[:3], v.shape[-1]), device=q.device)                # [b, h, q, d] fp32
        allowed = causal_mask(q_len, kv_len, q.device) if causal else None              # [q, kv]
        for start in range(0, kv_len, self.options.block_size):
            end = min(start + self.options.block_size, kv_len)
            scores = torch.matmul(qf, k[:, :, start:end].float().transpose(2, 3))      # [b, h, q, block]
            if allowed is not None:
                scores = scores.masked_fill(~allowed[:, start:end], float("-inf"))
            new_best = torch.maximum(best, scores.amax(-1, keepdim=True))
            safe = torch.where(torch.isinf(new_best), torch.zeros_like(new_best), new_best)
            weights = torch.exp(scores - safe)
            correction = torch.exp(best - safe)
            total = total * correction + weights.sum(-1, keepdim=True)
            acc = acc * correction + torch.matmul(weights, v[:, :, start:end].float())
            best = new_best
        return (acc / total).to(q.dtype).transpose(1, 2).contiguous()
