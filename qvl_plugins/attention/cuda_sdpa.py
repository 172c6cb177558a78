"""Helpers of the SDPA plugins that force one CUDA backend: hardware reasons and the masked call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from qvl_pipeline.slots.attention import repeat_kv_heads


def forced_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float,
                backend: SDPBackend) -> torch.Tensor:
    """SDPA restricted to `backend`. q [b, h, q_len, d]; k, v [b, kv_h, kv_len, d] -> [b, q_len, h, d].

    kv heads are expanded (the fused kernels' GQA support varies by version). Causal masks take no memory:
    is_causal when q_len == kv_len, a lower-right CausalBias when 1 < q_len < kv_len (the queries are the last
    positions; both fused kernels implement it natively), none for a single query, which sees every key.
    """
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
            # Imported here: torch.nn.attention.bias pulls in torch._dynamo (~1.5 s), which screening a chain
            # (importing the class to validate it) must not pay on machines where the plugin is rejected.
            from torch.nn.attention.bias import causal_lower_right

            mask = causal_lower_right(q_len, kv_len)
    if not q.is_cuda:
        # Layers the memory plan keeps on the CPU (cuda_partial) reach the same plugin: there torch's own
        # CPU SDPA kernel computes the same maths instead of failing the whole slot at run time.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
        return out.transpose(1, 2).contiguous()
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2).contiguous()
