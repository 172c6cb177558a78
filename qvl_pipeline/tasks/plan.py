"""task=plan: print what this run would use and why (and save it as plan.json)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qvl_pipeline.container import RootContainer
from qvl_pipeline.plan import build_plan, render_plan


def run(cfg: Mapping[str, Any], container: RootContainer, results_dir: Path | None = None) -> int:
    plan = build_plan(cfg, container.core.hardware_report(), container.core.resolver())
    if cfg.get("output") == "json":
        print(json.dumps(plan, indent=2))
    else:
        print(render_plan(plan))
    if results_dir is not None:
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "plan.json").write_text(json.dumps(plan, indent=2))
    return 0
