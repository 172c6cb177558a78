"""Fallback resolution against RunFacts: explicit choice or first usable chain entry per slot, every rejection
recorded, each plugin with its own typed options."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from qvl_pipeline.errors import ConfigError, PluginError, QvlError
from qvl_pipeline.facts import RunFacts
from qvl_pipeline.options import build_options, options_as_dict
from qvl_pipeline.registry import PluginRegistry, PluginSpec
from qvl_pipeline.slots import SLOTS, Fidelity, KernelsBackend, KVCacheBackend, Plugin
from qvl_pipeline.slots.kernels import dtype_name
from qvl_pipeline.slots.kv_cache import planned_kv

FIDELITY_BY_NAME = {level.name.lower(): level for level in Fidelity}


class SlotChoice(Protocol):
    """What the resolver reads of a slot's config (`SlotConfig` in the schema)."""

    choice: str | None
    options: Mapping[str, Mapping[str, Any]]


class OptLevel(Protocol):
    """What the resolver reads of the opt level (`OptConfig` in the schema)."""

    level: str
    max_fidelity: str
    self_test: bool


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
    origin: str = ""                       # the package the chosen plugin came from
    options: dict[str, Any] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"slot": self.slot, "chosen": self.chosen, "how": self.how, "summary": self.summary,
                "fidelity": self.fidelity, "origin": self.origin, "options": dict(self.options),
                "candidates": list(self.candidates), "rejected": [r.to_dict() for r in self.rejected]}


def fidelity_ceiling(name: str) -> Fidelity:
    """The Fidelity an opt level's `max_fidelity` names."""
    key = name.lower()
    if key not in FIDELITY_BY_NAME:
        raise ConfigError(f"opt.max_fidelity={name!r} is not a fidelity level",
                          f"use one of: {', '.join(FIDELITY_BY_NAME)}")
    return FIDELITY_BY_NAME[key]


class Resolver:
    """Resolves each slot once per run; `fallback` moves a slot along its chain after a runtime failure."""

    def __init__(self, registry: PluginRegistry, facts: RunFacts, opt: OptLevel,
                 slots: Mapping[str, SlotChoice]) -> None:
        self.registry = registry
        self.facts = facts
        self.opt = opt
        self.slots = slots
        self.ceiling = fidelity_ceiling(opt.max_fidelity)
        self._plugins: dict[str, Plugin] = {}
        self._references: dict[str, Plugin] = {}
        self._positions: dict[str, int] = {}
        self._run_facts: RunFacts | None = None
        self.decisions: dict[str, SlotDecision] = {}
        self._check_option_names()

    # -- public -------------------------------------------------------------------------------------------
    def resolve(self, slot: str) -> Plugin:
        """The plugin for `slot` (cached): the explicit choice, or the first usable entry of the chain."""
        if slot in self._plugins:
            return self._plugins[slot]
        if slot not in SLOTS:
            raise PluginError(f"unknown slot {slot!r}", f"slots are: {', '.join(SLOTS)}")
        decision = SlotDecision(slot=slot)
        self.decisions[slot] = decision
        choice = self.slots[slot].choice
        if choice:
            plugin = self._resolve_explicit(slot, str(choice), decision)
        else:
            plugin = self._resolve_chain(slot, decision, start=0)
        self._plugins[slot] = plugin
        return plugin

    def facts_for(self, slot: str) -> RunFacts:
        """The facts `slot`'s plugins validate against: the memory slot sees the run's facts (`run_facts`), so it
        plans with the weight and KV-cache bytes that will really be allocated; the others the facts as gathered."""
        return self.run_facts() if slot == "memory" else self.facts

    def run_facts(self) -> RunFacts:
        """The facts the run goes by: the gathered facts with what two plugins decide — how the chosen kernels
        plugin stores the weights (RunFacts.weights) and in which dtype it computes (RunFacts.compute_dtype), and how
        the chosen kv_cache plugin stores the cache (RunFacts.kv: its dtype and bytes per position) — and the context
        budget derived again at that size."""
        if self._run_facts is None:
            kernels = self.resolve("kernels")
            stored = self.facts.model.stored_dtype
            facts = self.facts
            if isinstance(kernels, KernelsBackend):
                facts = replace(facts, weights=kernels.weight_format(stored),
                                compute_dtype=dtype_name(kernels.compute_dtype(getattr(torch, stored))))
            backend = self.resolve("kv_cache")
            if isinstance(backend, KVCacheBackend):
                kv = planned_kv(backend, facts)
                facts = replace(facts, kv=kv, context=facts.context.for_kv(kv.bytes_per_position))
            self._run_facts = facts
        return self._run_facts

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

    def chain(self, slot: str) -> tuple[str, ...]:
        chain = self.facts.hardware.chains.get(slot)
        if not chain:
            raise PluginError(f"hardware profile {self.facts.hardware.name!r} declares no chain for slot {slot!r}",
                              f"add hardware.chains.{slot}: [...] to the profile, or choose one: "
                              f"{slot}={self.registry.names(slot)[0]}")
        return chain

    # -- internals ----------------------------------------------------------------------------------------
    def _check_option_names(self) -> None:
        """Options given for a plugin the slot does not have are a typo: say so before anything runs."""
        for slot in SLOTS:
            for name in self.slots[slot].options or {}:
                if not self.registry.has(slot, name):
                    raise ConfigError(f"{slot}.options.{name}: there is no {slot} plugin named {name!r}",
                                      f"options are per plugin: {slot}.options.<plugin>.<option>=value with "
                                      f"<plugin> one of {', '.join(self.registry.names(slot))}")

    def _options(self, spec: PluginSpec) -> Any:
        raw = (self.slots[spec.slot].options or {}).get(spec.name) or {}
        return build_options(spec.cls.Options, raw, f"{spec.slot}.options.{spec.name}")

    def reference(self, slot: str) -> Plugin:
        """An instance of the slot's reference plugin (what self-tests compare against)."""
        if slot not in self._references:
            name = SLOTS[slot].reference
            spec = self.registry.load(slot, name)
            self._references[slot] = spec.cls(self.facts_for(slot), None, name=name)
        return self._references[slot]

    def _resolve_explicit(self, slot: str, name: str, decision: SlotDecision) -> Plugin:
        decision.how, decision.candidates = "explicit", [name]
        spec = self.registry.load(slot, name)   # unknown name -> PluginError listing the available ones
        options = self._options(spec)
        reasons = spec.cls.validate(self.facts_for(slot), options)
        if reasons:
            raise PluginError(f"{slot}={name} cannot run here ({self.facts.hardware.name}, "
                              f"{self.facts.model.source}): " + "; ".join(reasons),
                              f"drop the override to let the {slot} chain choose, or pick another of: "
                              f"{', '.join(self.registry.names(slot))}")
        plugin, failure = self._instantiate(spec, options)
        if plugin is None:
            raise PluginError(f"{slot}={name} failed its self-test: {failure}",
                              f"drop the override {slot}={name} to let the chain choose")
        note = f"chosen explicitly beyond opt={self.opt.level}" if spec.cls.fidelity > self.ceiling else ""
        self._accept(decision, spec, plugin, note)
        return plugin

    def _resolve_chain(self, slot: str, decision: SlotDecision, start: int) -> Plugin:
        chain = self.chain(slot)
        decision.how, decision.candidates = "chain", list(chain)
        for position in range(start, len(chain)):
            name = chain[position]
            spec, options, reasons = self.screen(slot, name)
            if reasons:
                decision.rejected.append(Rejection(name, reasons))
                continue
            assert spec is not None
            plugin, failure = self._instantiate(spec, options)
            if plugin is None:
                decision.rejected.append(Rejection(name, [f"self-test failed: {failure}"]))
                continue
            self._positions[slot] = position
            self._accept(decision, spec, plugin)
            return plugin
        decision.chosen = None
        lines = [f"  - {r.plugin}: {'; '.join(r.reasons)}" for r in decision.rejected]
        raise PluginError(f"no usable {slot} plugin: every entry of the chain {list(chain)} was rejected\n"
                          + "\n".join(lines),
                          f"pick a plugin explicitly ({slot}=NAME), a wider opt level, or another hardware profile")

    def screen(self, slot: str, name: str) -> tuple[PluginSpec | None, Any, list[str]]:
        """(spec, options, reasons it is unusable); a broken plugin is rejected, never crashes the run."""
        if not self.registry.has(slot, name):
            return None, None, [f"not installed (known {slot} plugins: {', '.join(self.registry.names(slot))})"]
        try:
            spec = self.registry.load(slot, name)
        except PluginError as exc:
            return None, None, [exc.message]
        if spec.cls.fidelity > self.ceiling:
            return spec, None, [f"fidelity {spec.cls.fidelity.name.lower()} is beyond opt={self.opt.level} "
                                f"(admits up to {self.ceiling.name.lower()})"]
        options = self._options(spec)       # a bad option is the user's error: ConfigError, not a rejection
        facts = self.facts_for(slot)        # outside the try: a kernels slot that fails is its own error
        try:
            return spec, options, list(spec.cls.validate(facts, options))
        except Exception as exc:  # a broken validate must not take the run down: reject and go on
            return spec, options, [f"validate raised {_one_line(exc)}"]

    def _instantiate(self, spec: PluginSpec, options: Any) -> tuple[Plugin | None, str]:
        try:
            plugin = spec.cls(self.facts_for(spec.slot), options, name=spec.name)
            if self.opt.self_test:
                plugin.self_test(self.reference(spec.slot))
        except QvlError:
            raise
        except Exception as exc:
            return None, _one_line(exc)
        return plugin, ""

    def _accept(self, decision: SlotDecision, spec: PluginSpec, plugin: Plugin, note: str = "") -> None:
        decision.chosen = spec.name
        decision.summary = spec.cls.summary + (f" ({note})" if note else "")
        decision.fidelity = spec.cls.fidelity.name.lower()
        decision.origin = spec.origin
        decision.options = options_as_dict(plugin.options)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
