"""qvl-pipeline: hardware-aware Qwen3-VL inference.

`from qvl_pipeline import Pipeline` gives the Python API; the import is lazy so that the CLI's config
handling starts without loading torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Pipeline"]


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from qvl_pipeline.runtime.pipeline import Pipeline

        return Pipeline
    raise AttributeError(name)
