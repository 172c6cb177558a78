"""Shared arithmetic of the memory plugins: the planner's constants (qvl_pipeline.memory_plan, where they live) and
the leading-layer count under a byte budget."""

from __future__ import annotations

from qvl_pipeline.memory_plan import GIB, VRAM_RESERVE_GB

__all__ = ["GIB", "VRAM_RESERVE_GB", "layers_that_fit"]


def layers_that_fit(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int) -> int:
    """How many leading decoder layers fit in `budget_bytes` after `fixed_bytes` (pure)."""
    used, count = fixed_bytes, 0
    for size in layer_bytes:
        if used + size > budget_bytes:
            break
        used += size
        count += 1
    return count
