"""The attention slot: scaled dot-product attention over already-projected, already-rotated heads."""

from __future__ import annotations

from itertools import pairwise

import torch

from qvl_pipeline.slots.base import Plugin
from qvl_pipeline.slots.kv_cache import Int8Rows


class AttentionBackend(Plugin):
    """softmax(q·kᵀ·scale [+ causal mask]) · v, with grouped-query heads.

    Shapes: q [batch, heads, q_len, head_dim]; k, v [batch, kv_heads, kv_len, head_dim] with
    heads % kv_heads == 0 and q_len <= kv_len. When causal, the queries are the *last* q_len positions of
    the kv sequence (query i may see keys 0 .. kv_len - q_len + i). Returns [batch, q_len, heads, head_dim].
    Softmax is computed in fp32 whatever the input dtype; the output has q's dtype.
    """

    slot = "attention"
    reference = "eager"

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
               scale: float) -> torch.Tensor:
        raise NotImplementedError

    def attend_int8(self, q: torch.Tensor, k: Int8Rows, v: Int8Rows, *, causal: bool, scale: float) -> torch.Tensor:
        """`attend` over keys and values an int8 KV cache keeps as int8 rows (KVCache.append_int8); the default
        widens them through the cache's read-back first. A plugin reading them directly must give the same result."""
        return self.attend(q, k.dequantize(), v.dequantize(), causal=causal, scale=scale)

    def attend_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                      *, scale: float) -> torch.Tensor:
        """Bidirectional attention within each segment of a packed sequence (vision: one image per segment).

        q, k, v: [heads, total, head_dim]; cu_seqlens: [segments + 1] int offsets. Returns [total, heads, head_dim].
        """
        outs = []
        bounds = cu_seqlens.tolist()
        for start, end in pairwise(bounds):
            if end == start:
                continue
            seg = self.attend(q[None, :, start:end], k[None, :, start:end], v[None, :, start:end],
                              causal=False, scale=scale)   # [1, len, heads, head_dim]
            outs.append(seg[0])
        return torch.cat(outs, dim=0)

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_attention

        check_attention(self, reference)


def repeat_kv_heads(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, kv_heads, len, d] -> [batch, kv_heads * groups, len, d] (each kv head serves `groups` q heads)."""
    if groups == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """[q_len, kv_len] bool, True where query i may attend key j (queries are the last q_len positions)."""
    offset = kv_len - q_len
    rows = torch.arange(q_len, device=device)[:, None] + offset
    cols = torch.arange(kv_len, device=device)[None, :]
    return cols <= rows
