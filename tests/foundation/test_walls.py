"""DESIGN §6, the walls of the house, checked on the import statements of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offenders(folder: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{path.relative_to(ROOT)} imports {name}" for path in modules(folder) for name in imports_of(path)
            if name.startswith(forbidden)]


@pytest.mark.parametrize(("folder", "forbidden"), [
    # The model math: torch and the slot interfaces only; never config, container, CLI or a concrete plugin.
    ("qvl_pipeline/model", ("hydra", "omegaconf", "qvl_pipeline.container", "qvl_pipeline.__main__",
                            "qvl_pipeline.runtime", "qvl_pipeline.resolver", "qvl_pipeline.registry", "qvl_plugins",
                            "dependency_injector")),
    # Plugins: the slot interfaces and shared helpers; never the container, the CLI, the registry or config.
    ("qvl_plugins", ("qvl_pipeline.container", "qvl_pipeline.__main__", "qvl_pipeline.registry",
                     "qvl_pipeline.resolver", "qvl_pipeline.config", "qvl_pipeline.runtime", "hydra", "omegaconf",
                     "dependency_injector")),
    # Generation never imports the runtime that drives it (the retry policy is handed in).
    ("qvl_pipeline/generation", ("qvl_pipeline.runtime", "qvl_pipeline.container", "qvl_plugins")),
    # The slot interfaces are the API everyone shares: nothing above them.
    ("qvl_pipeline/slots", ("qvl_pipeline.container", "qvl_pipeline.runtime", "qvl_pipeline.resolver",
                            "qvl_pipeline.registry", "qvl_pipeline.config", "qvl_plugins", "hydra", "omegaconf")),
])
def test_dependency_rules(folder, forbidden):
    assert offenders(folder, forbidden) == []


def test_only_the_entry_point_and_config_loading_know_hydra():
    users = {str(path.relative_to(ROOT)) for path in modules("qvl_pipeline")
             if any(name.startswith("hydra") for name in imports_of(path))}
    assert users <= {"qvl_pipeline/__main__.py", "qvl_pipeline/config/load.py", "qvl_pipeline/config/schema.py"}


def test_only_the_registry_names_concrete_plugins():
    # (The registry names them as strings; the kernel benchmark measures the kernels' modules directly.)
    users = {str(path.relative_to(ROOT)) for path in modules("qvl_pipeline")
             if any(name.startswith("qvl_plugins") for name in imports_of(path))}
    assert {u for u in users if not u.startswith("qvl_pipeline/bench/")} == set(), users
