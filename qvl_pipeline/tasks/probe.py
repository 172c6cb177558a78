"""task=probe: this machine as hardware-profile YAML that is itself a valid profile."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer


def probe_yaml(report_facts: Mapping[str, Any], chains: Mapping[str, Any], budgets: Mapping[str, Any],
               notes: list[str]) -> str:
    """Profile YAML for the probed facts with the given chains and budgets (pure)."""
    facts = dict(report_facts)
    cpu_model = facts["cpu"]["model"]
    profile = {
        "name": "my_machine",
        "description": f"probed: {cpu_model}" + (f", {facts['gpu']['name']}" if facts.get("gpu") else ""),
        "cpu": facts["cpu"],
        "ram_gb": facts["ram_gb"],
        "gpu": facts.get("gpu"),
        "storage": facts["storage"],
        "budgets": dict(budgets),
        "chains": {slot: list(chain) for slot, chain in chains.items()},
    }
    header = ["# Probed machine profile: save as conf/hardware/my_machine.yaml, use with hardware=my_machine."]
    header += [f"# note: {note}" for note in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(profile, sort_keys=False)


def run(config: RootConfig, container: RootContainer) -> int:
    report = container.core.hardware_report()
    facts = report.profile.to_dict()
    print(probe_yaml(facts, report.profile.chains, config.hardware.budgets, report.notes), end="")
    return 0
