"""Self-test cases shared by the attention plugins: tiny random GQA inputs checked against eager attention."""

from __future__ import annotations

import torch

from qvl_pipeline.slots.attention import AttentionBackend
from qvl_pipeline.slots.selftest import check_close, failures_as_selftest_error

# (batch, heads, kv_heads, q_len, kv_len, head_dim, causal): decode, chunked decode, prefill, bidirectional.
CASES: tuple[tuple[int, int, int, int, int, int, bool], ...] = (
    (1, 4, 2, 1, 9, 16, True),
    (1, 4, 2, 3, 9, 16, True),
    (2, 4, 2, 6, 6, 16, True),
    (1, 2, 2, 5, 5, 16, False),
)


def check_against_eager(backend: AttentionBackend, device: torch.device | str,
                        dtype: torch.dtype = torch.float32) -> float:
    """Run CASES and one varlen pack through `backend` and through eager attention in fp32 on the same inputs;
    raise SelfTestError beyond the backend's fidelity (widened for half dtypes). Returns the worst error."""
    from qvl_plugins.attention.eager import EagerAttention  # the slot's reference plugin

    reference = EagerAttention(backend.hw)
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with failures_as_selftest_error(f"{type(backend).__name__} self-test on {device} ({dtype})"):
        for b, h, kvh, q_len, kv_len, d, causal in CASES:
            q, k, v = (torch.randn(b, n_heads, n, d, generator=gen).to(device, dtype)
                       for n_heads, n in ((h, q_len), (kvh, kv_len), (kvh, kv_len)))
            got = backend.attend(q, k, v, causal=causal, scale=d ** -0.5)
            want = reference.attend(q.float(), k.float(), v.float(), causal=causal, scale=d ** -0.5)
            what = f"attend(q_len={q_len}, kv_len={kv_len}, heads={h}/{kvh}, causal={causal})"
            worst = max(worst, check_close(what, got, want, backend.fidelity, dtype))
        q, k, v = (torch.randn(2, 7, 16, generator=gen).to(device, dtype) for _ in range(3))
        cu_seqlens = torch.tensor([0, 3, 7], device=device)
        got = backend.attend_varlen(q, k, v, cu_seqlens, scale=0.25)
        want = reference.attend_varlen(q.float(), k.float(), v.float(), cu_seqlens, scale=0.25)
        worst = max(worst, check_close("attend_varlen(segments 3+4)", got, want, backend.fidelity, dtype))
    return worst
