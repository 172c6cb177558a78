"""The capacity check the KV-cache plugins share: one wording for every overflow."""

from __future__ import annotations

from qvl_pipeline.slots.kv_cache import ContextOverflowError


def check_capacity(max_len: int, end: int) -> None:
    """Raise ContextOverflowError naming both numbers when a step needs `end` > `max_len` positions."""
    if end > max_len:
        raise ContextOverflowError(
            f"the KV cache holds {max_len} positions but this step needs {end}; "
            f"raise generate.max_context or shorten the prompt/max_new_tokens")
