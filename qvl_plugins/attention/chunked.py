"""Attention over query chunks: the score matrix never exceeds chunk_size × kv_len (long-prefill memory saver)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl_pipeline.slots.attention import AttentionBackend, causal_mask
from qvl_pipeline.slots.base import Fidelity, Plugin
from qvl_pipeline.slots.checks import check_attention


@dataclass(frozen=True)
class ChunkedOptions:
    chunk_size: int = 1024        # query rows per chunk: scores take chunk_size × kv_len × 4 bytes per head

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive row count, got {self.chunk_size}")


class ChunkedAttention(AttentionBackend):
    fidelity = Fidelity.EXACT
    summary = ("eager maths over query chunks of chunk_size rows (scores ≤ chunk×kv, fp32 softmax); "
               "any device; bounds prefill memory where the full score matrix would not fit")
    Options = ChunkedOptions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        b, heads, q_len, d = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        offset = kv_len - q_len                     # queries are the last q_len positions
        out = q.new_empty(b, q_len, heads, v.shape[-1])
        chunk = self.options.chunk_size
        for start in range(0, q_len, chunk):
            end = min(start + chunk, q_len)
            n = end - start
            # Under the causal mask no query of this chunk sees a key past offset + end: skip those keys.
            keys = offset + end if causal else kv_len
            # Grouped heads ride along the row axis: [b, h, n, d] -> [b, kv_h, g·n, d], no kv expansion.
            qc = q[:, :, start:end].reshape(b, kv_heads, groups * n, d)
            scores = torch.matmul(qc, k[:, :, :keys].transpose(2, 3)) * scale      # [b, kv_h, g·n, keys]
            if causal:
                allowed = causal_mask(n, keys, q.device)                             # [n, keys]
                scores = scores.view(b, kv_heads, groups, n, keys)
                scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
                scores = scores.view(b, kv_heads, groups * n, keys)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            ctx = torch.matmul(probs, v[:, :, :keys])                                # [b, kv_h, g·n, dv]
            out[:, start:end] = ctx.view(b, heads, n, -1).transpose(1, 2)
        return out                                                                   # [b, q_len, h, dv]

    def self_test(self, reference: Plugin) -> None:
        check_attention(self, reference)
        # The configured chunk is larger than the tiny cases: also run them split into 2-row chunks.
        check_attention(type(self)(self.facts, ChunkedOptions(chunk_size=2), name=self.name), reference)
