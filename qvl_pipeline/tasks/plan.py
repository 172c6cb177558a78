"""task=plan: print what this run would use and why (and save it as plan.json); loads no weights."""

from __future__ import annotations

import json
from pathlib import Path

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.plan import render_plan
from qvl_pipeline.tasks.results import write_unit


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    plan = container.core.plan().to_dict()
    if config.output == "json":
        print(json.dumps(plan, indent=2))
    else:
        print(render_plan(plan))
    if results_dir is not None:
        write_unit(results_dir, {"plan.json": plan})
    return 0
