"""Fallback resolution: explicit choice or first usable chain entry per slot, with every rejection recorded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qvl_pipeline.errors import PluginError
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.registry import PluginRegistry
from qvl_pipeline.slots import SLOTS, Fidelity, Plugin

FIDELITY_BY_NAME = {level.name.lower(): level for level in Fidelity}


@dataclass
class Rejection:
    plugin: str
    reasons: list[str]
    stage: str = "resolve"   # resolve | runtime

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "reasons": list(self.reasons), "stage": self.stage}


@dataclass
class SlotDecision:
    slot: str
    chosen: str | None = None
    how: str = ""                          # explicit | chain
    summary: str = ""
    fidelity: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "chosen": self.chosen, "how": self.how, "summary": self.summary,
                "fidelity": self.fidelity, "options": dict(self.options), "candidates": list(self.candidates),
                "rejected": [r.to_dict() for r in self.rejected]}


def max_fidelity(cfg: Mapping[str, Any]) -> Fidelity:
    name = str(cfg.get("opt", {}).get("max_fidelity", "approximate")).lower()
    if name not in FIDELITY_BY_NAME:
        raise PluginError(f"opt.max_fidelity={name!r} is not a fidelity level",
                          f"use one of: {', '.join(FIDELITY_BY_NAME)}")
    return FIDELITY_BY_NAME[name]


class Resolver:
    """Resolves each slot once per run; `fallback` moves a slot along its chain after a runtime failure."""

    def __init__(self, registry: PluginRegistry, hw: HardwareProfile, cfg: Mapping[str, Any]) -> None:
        self.registry = registry
        self.hw = hw
        self.cfg = cfg
        self.ceiling = max_fidelity(cfg)
        self.run_self_tests = bool(cfg.get("opt", {}).get("self_test", True))
        self._plugins: dict[str, Plugin] = {}
        self._positions: dict[str, int] = {}
        self.decisions: dict[str, SlotDecision] = {}

    # -- public -------------------------------------------------------------------------------------------
    def resolve(self, slot: str) -> Plugin:
        """The plugin for `slot` (cached): the explicit choice, or the first usable entry of the chain."""
        if slot in self._plugins:
            return self._plugins[slot]
        if slot not in SLOTS:
            raise PluginError(f"unknown slot {slot!r}", f"slots are: {', '.join(SLOTS)}")
        slot_cfg = self.cfg.get(slot) or {}
        choice = slot_cfg.get("choice")
        decision = SlotDecision(slot=slot, options=dict(slot_cfg.get("options") or {}))
        self.decisions[slot] = decision
        if choice:
            plugin = self._resolve_explicit(slot, str(choice), decision)
        else:
            plugin = self._resolve_chain(slot, decision, start=0)
        self._plugins[slot] = plugin
        return plugin

    def resolve_all(self) -> dict[str, Plugin]:
        return {slot: self.resolve(slot) for slot in SLOTS}

    def fallback(self, slot: str, error: BaseException) -> Plugin:
        """Reject the current plugin of `slot` for a runtime `error` and return the next usable one."""
        decision = self.decisions.get(slot)
        if decision is None or decision.chosen is None:
            return self.resolve(slot)
        decision.rejected.append(Rejection(decision.chosen, [f"failed while running: {_one_line(error)}"],
                                           stage="runtime"))
        if decision.how == "explicit":
            raise PluginError(f"{slot} plugin {decision.chosen!r} was chosen explicitly and failed while running: "
                              f"{_one_line(error)}", f"drop the override {slot}={decision.chosen} to allow "
                              "falling back along the hardware profile's chain") from error
        plugin = self._resolve_chain(slot, decision, start=self._positions[slot] + 1)
        self._plugins[slot] = plugin
        return plugin

    def plan(self) -> dict[str, Any]:
        self.resolve_all()
        return {slot: self.decisions[slot].to_dict() for slot in SLOTS}

    # -- internals ----------------------------------------------------------------------------------------
    def _chain(self, slot: str) -> tuple[str, ...]:
        chain = self.hw.chains.get(slot)
        if not chain:
            raise PluginError(f"hardware profile {self.hw.name!r} declares no chain for slot {slot!r}",
                              f"add hardware.chains.{slot}: [...] to the profile, or choose one: "
                              f"{slot}={self.registry.names(slot)[0]}")
        return chain

    def _resolve_explicit(self, slot: str, name: str, decision: SlotDecision) -> Plugin:
        decision.how, decision.candidates = "explicit", [name]
        cls = self.registry.load(slot, name)   # unknown name -> PluginError listing the available ones
        reasons = cls.validate(self.hw, self.cfg)
        if reasons:
            raise PluginError(f"{slot}={name} cannot run on this machine ({self.hw.name}): " + "; ".join(reasons),
                              f"drop the override to let the {slot} chain choose, or pick another of: "
                              f"{', '.join(self.registry.names(slot))}")
        plugin, failure = self._instantiate(cls, decision)
        if plugin is None:
            raise PluginError(f"{slot}={name} failed its self-test: {failure}",
                              f"drop the override {slot}={name} to let the chain choose")
        self._accept(decision, plugin, note=self._fidelity_note(cls))
        return plugin

    def _resolve_chain(self, slot: str, decision: SlotDecision, start: int) -> Plugin:
        chain = self._chain(slot)
        decision.how, decision.candidates = "chain", list(chain)
        for position in range(start, len(chain)):
            name = chain[position]
            reasons = self._screen(slot, name)
            if reasons:
                decision.rejected.append(Rejection(name, reasons))
                continue
            plugin, failure = self._instantiate(self.registry.load(slot, name), decision)
            if plugin is None:
                decision.rejected.append(Rejection(name, [f"self-test failed: {failure}"]))
                continue
            self._positions[slot] = position
            self._accept(decision, plugin)
            return plugin
        decision.chosen = None
        lines = [f"  - {r.plugin}: {'; '.join(r.reasons)}" for r in decision.rejected]
        raise PluginError(f"no usable {slot} plugin: every entry of the chain {list(chain)} was rejected\n"
                          + "\n".join(lines),
                          f"pick a plugin explicitly ({slot}=NAME), a wider opt level, or another hardware profile")

    def _screen(self, slot: str, name: str) -> list[str]:
        if not self.registry.has(slot, name):
            return [f"not installed (known {slot} plugins: {', '.join(self.registry.names(slot))})"]
        try:
            cls = self.registry.load(slot, name)
        except PluginError as exc:
            return [exc.message]
        if cls.fidelity > self.ceiling:
            level = self.cfg.get("opt", {}).get("level", "?")
            return [f"fidelity {cls.fidelity.name.lower()} is beyond opt={level} "
                    f"(admits up to {self.ceiling.name.lower()})"]
        try:
            return list(cls.validate(self.hw, self.cfg))
        except Exception as exc:  # a broken validate must not take the run down: reject and go on
            return [f"validate raised {_one_line(exc)}"]

    def _instantiate(self, cls: type[Plugin], decision: SlotDecision) -> tuple[Plugin | None, str]:
        try:
            plugin = cls(self.hw, decision.options)
            if self.run_self_tests:
                plugin.self_test()
        except Exception as exc:
            return None, _one_line(exc)
        return plugin, ""

    def _accept(self, decision: SlotDecision, plugin: Plugin, note: str = "") -> None:
        decision.chosen = plugin.name
        decision.summary = plugin.summary + (f" ({note})" if note else "")
        decision.fidelity = plugin.fidelity.name.lower()

    def _fidelity_note(self, cls: type[Plugin]) -> str:
        if cls.fidelity > self.ceiling:
            return f"chosen explicitly beyond opt={self.cfg.get('opt', {}).get('level', '?')}"
        return ""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
