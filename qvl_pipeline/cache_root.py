"""Where the project keeps what it derives on this machine (quantised weights, native library builds, measured
disk speeds, warm-start hints). Imports nothing heavy: the CLI reads it before torch is imported."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "QVL_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$QVL_CACHE_DIR` (read when called, so a changed environment counts), else `~/.cache/qvl_pipeline`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qvl_pipeline")
