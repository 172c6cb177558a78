"""task=generate: placeholder until the model stage lands."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qvl_pipeline.container import RootContainer
from qvl_pipeline.errors import ConfigError


def run(cfg: Mapping[str, Any], container: RootContainer, results_dir: Path | None = None) -> int:
    raise ConfigError("task=generate is not available yet", "use task=plan")
