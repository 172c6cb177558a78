"""Shared arithmetic of the memory plugins: the VRAM reserve and GPU layer budgets."""

from __future__ import annotations

GIB = 1024 ** 3
VRAM_RESERVE_GB = 0.5      # VRAM kept free for activations, the CUDA context and the KV cache


def layers_that_fit(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int) -> int:
    """How many leading decoder layers fit in `budget_bytes` after `fixed_bytes` (pure)."""
    used, count = fixed_bytes, 0
    for size in layer_bytes:
        if used + size > budget_bytes:
            break
        used += size
        count += 1
    return count
