"""The per-step NaN/Inf check on the logits: one cheap sum, exact when the sum is not finite."""

from __future__ import annotations

import torch

from qvl_pipeline.generation.engine import _all_finite


def test_finite_logits_pass_also_when_their_sum_overflows():
    assert _all_finite(torch.randn(1, 1000))
    assert _all_finite(torch.full((1, 1000), 3e38))                # sum overflows to inf, every entry is finite
    assert _all_finite(torch.tensor([[1, 2, 3]]))                  # integer tensors are always finite


def test_any_nan_or_inf_is_caught():
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.bfloat16):
            t = torch.zeros(1, 151936, dtype=dtype)
            t[0, 12345] = bad
            assert not _all_finite(t)
    both = torch.zeros(1, 10)
    both[0, 1], both[0, 2] = float("inf"), float("-inf")          # sums to NaN
    assert not _all_finite(both)
