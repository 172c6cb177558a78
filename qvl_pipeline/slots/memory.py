"""The memory slot: where each part of the model lives (GPU, CPU RAM, SSD) and how it moves."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.facts import RunFacts
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.memory_plan import Bandwidths, MemoryPlan, ModelBytes, plan_or_refuse
from qvl_pipeline.slots.base import Plugin
from qvl_pipeline.weight_format import (
    FLOAT_BYTES,
    WeightFormat,
    int4_suggestion,
    int8_suggestion,
    kv_bytes_per_position,
)

DEVICE_OF_TIER = {"gpu": "cuda", "cpu": "cpu", "disk": "cpu"}   # a part on disk computes on the CPU


@dataclass(frozen=True)
class Placement:
    """Device of the vision tower, of the embeddings/head and of each decoder layer; `on_disk` names the parts whose
    weights stay on disk and are read when used ("vision", "embed", "head", "layers.N"; they compute on their
    device); `plan` is the planner's placement when the plugin followed it (tiers, budgets, ceilings)."""

    vision: str
    embed: str
    head: str
    layers: tuple[str, ...]
    on_disk: frozenset[str] = frozenset()
    plan: MemoryPlan | None = field(default=None, compare=False)

    @classmethod
    def from_plan(cls, memory_plan: MemoryPlan) -> Placement:
        on_disk = {part for part in ("vision", "embed", "head") if getattr(memory_plan, part) == "disk"}
        on_disk |= {f"layers.{i}" for i, tier in enumerate(memory_plan.layers) if tier == "disk"}
        return cls(vision=DEVICE_OF_TIER[memory_plan.vision], embed=DEVICE_OF_TIER[memory_plan.embed],
                   head=DEVICE_OF_TIER[memory_plan.head],
                   layers=tuple(DEVICE_OF_TIER[t] for t in memory_plan.layers), on_disk=frozenset(on_disk),
                   plan=memory_plan)

    @property
    def streamed_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.layers)) if f"layers.{i}" in self.on_disk)

    def summary(self) -> str:
        def where(part: str, device: str) -> str:
            return f"disk (computed on {device})" if part in self.on_disk else device
        counts: dict[str, int] = {}
        for i, dev in enumerate(self.layers):
            key = where(f"layers.{i}", dev)
            counts[key] = counts.get(key, 0) + 1
        per_dev = ", ".join(f"{n} on {dev}" for dev, n in counts.items())
        return (f"vision on {where('vision', self.vision)}, embeddings on {where('embed', self.embed)}, head on "
                f"{where('head', self.head)}; layers: {per_dev}")


@dataclass(frozen=True)
class ModelParts:
    """The model's parts as the memory slot sees them, in the order a request runs them (built by the assembly)."""

    vision: nn.Module
    vision_blocks: tuple[nn.Module, ...]
    embed: nn.Module
    layers: tuple[nn.Module, ...]
    norm: nn.Module
    head: nn.Module | None            # None: the embedding table is the head (tied, not quantised)
    # Puts another module in the head's place (e.g. the same head computed in row ranges); None: not replaceable.
    replace_head: Callable[[nn.Module], None] | None = None


def bandwidths(hw: HardwareProfile) -> Bandwidths:
    """The machine's bandwidths the planner prices tiers with (GB/s; 0 = unknown)."""
    gpu = hw.gpu if hw.cuda_usable else None
    return Bandwidths(ram=hw.cpu.memory_bandwidth_gb_s, disk=hw.storage.read_mb_s / 1000,
                      gpu=gpu.memory_bandwidth_gb_s if gpu else 0.0, pcie=gpu.pcie_gb_s if gpu else 0.0)


def model_bytes(facts: RunFacts, fmt: WeightFormat | None = None) -> ModelBytes:
    """The planner's view of the run's model in `fmt` (default: the chosen kernels plugin's), estimated from
    config.json; the KV cache in the model's float dtype."""
    fmt = fmt or facts.weight_format
    s = facts.model.sizes(fmt)
    kv = kv_bytes_per_position(facts.model.hf_config, FLOAT_BYTES[facts.model.stored_dtype])
    return ModelBytes(layers=(s.layer,) * s.layers, vision=s.vision, vision_block=s.vision_block,
                      vision_depth=s.vision_depth, embed=s.embed, head=s.head, kv_per_position=kv,
                      label=fmt.name)


def measured_bytes(facts: RunFacts, layer_bytes: list[int], vision_bytes: int, embed_bytes: int,
                   head_bytes: int) -> ModelBytes:
    """The planner's view from the loaded model's real sizes (the vision block scaled from the estimate)."""
    estimate = model_bytes(facts)
    block = estimate.vision_block * vision_bytes // estimate.vision if estimate.vision else 0
    return ModelBytes(layers=tuple(layer_bytes), vision=vision_bytes, vision_block=block,
                      vision_depth=estimate.vision_depth, embed=embed_bytes, head=head_bytes,
                      kv_per_position=estimate.kv_per_position, label=estimate.label)


def alternatives(facts: RunFacts) -> dict[str, ModelBytes]:
    """Smaller weight formats a refusal may suggest, gentlest first: int8 for float weights, then int4."""
    fmt, stored = facts.weight_format, facts.model.stored_dtype
    found = {}
    if fmt.linear.kind == "float":
        found["int8 weights (opt=moderate kernels=int8_weight_only)"] = model_bytes(facts, int8_suggestion(stored))
    if fmt.linear.kind != "int4":
        found["int4 weights (opt=aggressive kernels=int4_weight_only)"] = model_bytes(facts, int4_suggestion(stored))
    return found


def plan_for(facts: RunFacts, mode: str, sizes: ModelBytes | None = None, **kwargs: object) -> MemoryPlan:
    """The planner's placement of `mode` for the run (estimated sizes unless `sizes`); a ConfigError naming the
    smallest fix when it does not fit."""
    return plan_or_refuse(mode, sizes or model_bytes(facts), facts.context.positions, facts.memory_budgets,
                          bandwidths(facts.hardware), alternatives=alternatives(facts), **kwargs)


def fits(facts: RunFacts, mode: str, **kwargs: object) -> list[str]:
    """[] when `mode` fits the budgets, else its one-line refusal with the fixes (for a plugin's validate)."""
    try:
        plan_for(facts, mode, **kwargs)
    except ConfigError as exc:
        return [f"{exc.message}; fix: {exc.hint}"]
    return []


class MemoryManager(Plugin):
    """Plans placement from the model's per-part sizes and the machine's budgets.

    A plugin that follows the planner names its `mode` (see qvl_pipeline.memory_plan) and gets `plan()` and a
    `place()` from it; one with its own rules overrides `place()` and leaves `mode` None. `attach()` runs once the
    parts are on their devices, for plugins that move weights while the model runs (streaming from disk).
    """

    slot = "memory"
    reference = "cpu"
    mode: ClassVar[str | None] = None

    def planner_options(self) -> dict[str, object]:
        """Extra keyword arguments of the planner for this plugin (e.g. a forced GPU layer count)."""
        return {}

    def plan(self) -> MemoryPlan | None:
        """The planned placement for the run's facts (estimated sizes); None for a plugin with its own rules."""
        if self.mode is None:
            return None
        return plan_for(self.facts, self.mode, **self.planner_options())

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        """Where each part goes, by the loaded model's real sizes (head_bytes 0: the embedding is the head)."""
        if self.mode is None:
            raise NotImplementedError
        sizes = measured_bytes(self.facts, layer_bytes, vision_bytes, embed_bytes, head_bytes)
        return Placement.from_plan(plan_for(self.facts, self.mode, sizes, **self.planner_options()))

    def attach(self, parts: ModelParts, placement: Placement) -> None:
        """Called once the parts are on their devices: start whatever moves weights while the model runs.
        Default: nothing moves."""

    def device(self) -> torch.device:
        """The device where requests start (inputs, sampler)."""
        return torch.device("cpu")

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_memory

        check_memory(self, reference)


__all__ = ["MemoryManager", "ModelParts", "Placement", "bandwidths", "fits", "model_bytes", "plan_for"]
