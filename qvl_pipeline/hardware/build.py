"""From the `hardware` config group to the effective HardwareProfile the resolver validates against."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.chains import cpu_chains, derive_chains
from qvl_pipeline.hardware.effective import OMP_ENV, ThreadPlan, reconcile, thread_plan
from qvl_pipeline.hardware.profile import RUN_SWITCHES, HardwareProfile, ProfileError, profile_from_dict

Prober = Callable[[str | None, bool], tuple[HardwareProfile, list[str]]]


@dataclass
class HardwareReport:
    """The profile in force and what the user should know about how it was obtained."""

    profile: HardwareProfile
    target: str
    probed: bool
    emulate: bool
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    described: HardwareProfile | None = None     # a named profile's own facts (None when probed)
    threads: ThreadPlan | None = None            # the run's threads (None: not decided, e.g. a report built by hand)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "probed": self.probed, "emulate": self.emulate,
                "differences": list(self.differences), "notes": list(self.notes),
                "facts": self.profile.to_dict(), "threads": self.threads.to_dict() if self.threads else None}


def build_hardware(hw_cfg: Mapping[str, Any], prober: Prober, model_path: str | None = None) -> HardwareReport:
    """Probe and/or validate the profile; errors name the malformed field."""
    data = dict(hw_cfg)
    probe, emulate, measure, pin = (bool(data.get(k, False)) for k in ("probe", "emulate", "measure", "pin_threads"))
    real, notes = prober(model_path, measure)
    chains = data.get("chains") or {}
    if probe:
        budgets = {k: v for k, v in (data.get("budgets") or {}).items() if v is not None}
        derived = {**derive_chains(real), **{slot: tuple(chain) for slot, chain in chains.items()}}
        profile = replace(real, name=str(data.get("name", "auto")), budgets=budgets, chains=derived)
        where = "this GPU" if real.cuda_usable else "this CPU"
        return HardwareReport(profile, target=profile.name, probed=True, emulate=False,
                              notes=[*notes, f"chains derived from {where}'s facts"],
                              threads=thread_plan(profile, data.get("threads"), pin, os.environ.get(OMP_ENV)))
    try:
        target = profile_from_dict({k: v for k, v in data.items() if k not in RUN_SWITCHES})
    except ProfileError as exc:
        raise ConfigError(f"malformed hardware profile {data.get('name', '?')!r}: {exc}",
                          "fix that field in conf/hardware/<profile>.yaml (or in your override)") from exc
    effective, differences = reconcile(target, real, emulate)
    if target.cuda_usable and not effective.cuda_usable:
        effective = replace(effective, chains={**effective.chains, **cpu_chains(effective)})
        differences.append("without a usable GPU the profile's chains give way to this CPU's "
                           "(fastest first on the CPU)")
    return HardwareReport(effective, target=target.name, probed=False, emulate=emulate,
                          differences=differences, notes=notes, described=target,
                          threads=thread_plan(effective, data.get("threads"), pin, os.environ.get(OMP_ENV), emulate))
