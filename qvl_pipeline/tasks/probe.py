"""task=probe: this machine as hardware-profile YAML that is itself a valid profile."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer


def profile_yaml(report_facts: Mapping[str, Any], chains: Mapping[str, Any], budgets: Mapping[str, Any], *,
                 name: str, description: str, header: Sequence[str], tuned: Sequence[str] = ()) -> str:
    """Profile YAML (pure): `header` lines as comments on top, then the facts with the given name, description,
    chains, budgets and (task=tune) `tuned` notes. The one writer of hardware profiles (task=probe, task=tune)."""
    facts = dict(report_facts)
    profile = {
        "name": name,
        "description": description,
        "cpu": facts["cpu"],
        "ram_gb": facts["ram_gb"],
        "gpu": facts.get("gpu"),
        "storage": facts["storage"],
        "budgets": dict(budgets),
        "chains": {slot: list(chain) for slot, chain in chains.items()},
    }
    if tuned:
        profile["tuned"] = list(tuned)
    comments = [f"# {line}".rstrip() for text in header for line in text.splitlines()]
    return "\n".join(comments) + "\n" + yaml.safe_dump(profile, sort_keys=False)


def probe_yaml(report_facts: Mapping[str, Any], chains: Mapping[str, Any], budgets: Mapping[str, Any],
               notes: list[str]) -> str:
    """Profile YAML for the probed facts with the given chains and budgets (pure)."""
    cpu_model = report_facts["cpu"]["model"]
    gpu = report_facts.get("gpu")
    return profile_yaml(report_facts, chains, budgets, name="my_machine",
                        description=f"probed: {cpu_model}" + (f", {gpu['name']}" if gpu else ""),
                        header=["Probed machine profile: save as conf/hardware/my_machine.yaml, use with "
                                "hardware=my_machine.", *(f"note: {note}" for note in notes)])


def run(config: RootConfig, container: RootContainer) -> int:
    report = container.core.hardware_report()
    facts = report.profile.to_dict()
    print(probe_yaml(facts, report.profile.chains, config.hardware.budgets, report.notes), end="")
    return 0
