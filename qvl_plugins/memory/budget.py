"""Shared arithmetic of the memory plugins: weight bytes from the run config, GPU layer budgets."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qvl_pipeline.model.sizing import count_params

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
GIB = 1024 ** 3


def stored_bytes_per_param(cfg: Mapping[str, Any]) -> int:
    return DTYPE_BYTES.get(str(cfg.get("model", {}).get("dtype", "auto")), 2)


def model_weight_bytes(cfg: Mapping[str, Any]) -> int | None:
    """Total weight bytes of the configured model, or None when the config carries no architecture."""
    hf_config = cfg.get("model", {}).get("hf_config")
    if not hf_config:
        return None
    return count_params(hf_config).total * stored_bytes_per_param(cfg)


def layers_that_fit(layer_bytes: list[int], fixed_bytes: int, budget_bytes: int) -> int:
    """How many leading decoder layers fit in `budget_bytes` after `fixed_bytes` (pure)."""
    used, count = fixed_bytes, 0
    for size in layer_bytes:
        if used + size > budget_bytes:
            break
        used += size
        count += 1
    return count
