"""Attention over query chunks: the score matrix never exceeds chunk_size × kv_len (long-prefill memory saver)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots.attention import AttentionBackend, causal_mask
from qvl_pipeline.slots.base import Fidelity


class ChunkedAttention(AttentionBackend):
    fidelity = Fidelity.EXACT
    summary = ("eager maths over query chunks of chunk_size rows (scores ≤ chunk×kv, fp32 softmax); "
               "any device; wins on long prefill where the full score matrix would not fit")

    def __init__(self, hw: HardwareProfile, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(hw, options)
        chunk = self.options.get("chunk_size", 1024)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"attention chunk_size must be a positive integer, got {chunk!r}",
                              hint="set attention.options.chunk_size=1024 (or any positive row count)")
        self.chunk_size = chunk

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        b, heads, q_len, d = q.shape
        kv_heads, kv_len = k.shape[1], k.shape[2]
        groups = heads // kv_heads
        offset = kv_len - q_len                     # queries are the last q_len positions
        out = q.new_empty(b, q_len, heads, v.shape[-1])
        for start in range(0, q_len, self.chunk_size):
            end = min(start + self.chunk_size, q_len)
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

    def self_test(self) -> None:
        from qvl_plugins.attention.reference_check import check_against_eager

        check_against_eager(self, "cpu")
        # The configured chunk is larger than the tiny cases: also run them split into 2-row chunks.
        check_against_eager(type(self)(self.hw, {**self.options, "chunk_size": 2}), "cpu")
