"""Saving a run's outputs next to its plan: written atomically, never over an earlier run's files."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_results(results_dir: Path, result: Mapping[str, Any], name: str = "result.json") -> Path:
    """results_dir/plan.json and results_dir/<name>; returns the result's path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(results_dir / "plan.json", json.dumps(result.get("plan", {}), indent=2))
    body = {k: v for k, v in result.items() if k != "plan"}
    path = results_dir / name
    write_atomic(path, json.dumps(body, indent=2, ensure_ascii=False))
    return path
