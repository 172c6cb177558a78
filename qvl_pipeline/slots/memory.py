"""The memory slot: where each part of the model lives (GPU, CPU RAM, SSD) and how it moves."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, overload

import torch
from torch import nn

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.facts import RunFacts
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.memory_plan import Bandwidths, MemoryPlan, ModelBytes, plan_or_refuse
from qvl_pipeline.slots.base import Plugin
from qvl_pipeline.slots.memory_share import smaller_gpu_share
from qvl_pipeline.weight_format import (
    FLOAT_BYTES,
    WeightFormat,
    int4_suggestion,
    int8_suggestion,
    kv_bytes_per_position,
)

# Where a part of each tier sits once placed: on disk it computes on the CPU; in pinned RAM it stays home on the CPU
# until the plugin's attach streams it to the GPU (COMPUTE_DEVICE_OF_TIER: where it computes, with its KV cache).
DEVICE_OF_TIER = {"gpu": "cuda", "cpu": "cpu", "disk": "cpu", "pinned": "cpu"}
COMPUTE_DEVICE_OF_TIER = {**DEVICE_OF_TIER, "pinned": "cuda"}


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
    def from_plan(cls, memory_plan: MemoryPlan, computing: bool = False) -> Placement:
        """Where `place` puts each part of the plan; `computing`: where each part computes once attached (what the
        plan predicts before loading; differs for layers streamed from pinned RAM)."""
        device = COMPUTE_DEVICE_OF_TIER if computing else DEVICE_OF_TIER
        on_disk = {part for part in ("vision", "embed", "head") if getattr(memory_plan, part) == "disk"}
        on_disk |= {f"layers.{i}" for i, tier in enumerate(memory_plan.layers) if tier == "disk"}
        return cls(vision=device[memory_plan.vision], embed=device[memory_plan.embed], head=device[memory_plan.head],
                   layers=tuple(device[t] for t in memory_plan.layers), on_disk=frozenset(on_disk),
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
class ModelParts(Sequence[nn.Module]):
    """What `MemoryManager.attach`/`detach` get: the decoder layers — iterating, indexing and len() see exactly
    them, so a plugin that moves layers treats this as the layer list — and the model's other parts as attributes,
    for plugins that move more (ssd_stream). Built by the assembly; in the order a request runs them."""

    layers: tuple[nn.Module, ...]
    vision: nn.Module | None = None
    vision_blocks: tuple[nn.Module, ...] = ()
    embed: nn.Module | None = None
    norm: nn.Module | None = None
    head: nn.Module | None = None     # None: the embedding table is the head (tied, not quantised)
    # Puts another module in the head's place (e.g. the same head computed in row ranges); None: not replaceable.
    replace_head: Callable[[nn.Module | None], None] | None = None

    @overload
    def __getitem__(self, index: int) -> nn.Module: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[nn.Module, ...]: ...

    def __getitem__(self, index: int | slice) -> nn.Module | tuple[nn.Module, ...]:
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.layers)


def bandwidths(hw: HardwareProfile) -> Bandwidths:
    """The machine's bandwidths the planner prices tiers with (GB/s; 0 = unknown)."""
    gpu = hw.gpu if hw.cuda_usable else None
    return Bandwidths(ram=hw.cpu.memory_bandwidth_gb_s, disk=hw.storage.read_mb_s / 1000,
                      gpu=gpu.memory_bandwidth_gb_s if gpu else 0.0, pcie=gpu.pcie_gb_s if gpu else 0.0)


def model_bytes(facts: RunFacts, fmt: WeightFormat | None = None) -> ModelBytes:
    """The planner's view of the run's model in `fmt` (default: the chosen kernels plugin's), estimated from
    config.json; the KV cache as the kv_cache plugin stores it (`facts.kv`), else in the activation dtype."""
    fmt = fmt or facts.weight_format
    s = facts.model.sizes(fmt)
    if facts.kv is not None:                          # every layer's bytes -> one layer's (the planner's unit)
        kv = -(-facts.kv.bytes_per_position // s.layers)
    else:
        kv = kv_bytes_per_position(facts.model.hf_config, FLOAT_BYTES[facts.activation_dtype])
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
    `place()` from it; one with its own rules overrides `place()` and leaves `mode` None. `attach()`/`detach()` run
    around a placement for plugins that move weights while the model runs (streaming); `shrink()` answers an
    out-of-memory.
    """

    slot = "memory"
    reference = "cpu"
    mode: ClassVar[str | None] = None
    # Whether the weights stay where `attach` left them until `detach` (no streaming, no swapping of storage): only
    # then may the kernels plugin's fused decode step keep pointers to them.
    resident_weights: ClassVar[bool] = False

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

    # ---- at run time (defaults: nothing moves while running; see qvl_pipeline/runtime/recovery.py) -------------
    def attach(self, layers: Sequence[nn.Module], placement: Placement) -> Placement:
        """Called once the parts sit where `place` said: a plugin that moves weights while running (streaming)
        hooks into them here. `layers` is the decoder layers — a ModelParts from the assembly, which also names the
        vision tower, embeddings, final norm and head. Returns the placement as the layers compute (their KV caches
        go there)."""
        return placement

    def detach(self, layers: Sequence[nn.Module]) -> None:
        """Undo `attach` before the placement changes (after an out-of-memory): weights back where `place` put
        them, hooks removed."""

    def shrink(self, placement: Placement) -> Placement | None:
        """After an out-of-memory (CUDA, or a MemoryBudgetExceeded this plugin raised): a placement with a smaller
        GPU share than the running `placement`, or None when there is none (the slot then moves down its chain).
        Default: the trailing half of the GPU decoder layers go to the CPU, then the vision tower and head."""
        return smaller_gpu_share(placement)

    def device(self) -> torch.device:
        """The device where requests start (inputs, sampler)."""
        return torch.device("cpu")

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_memory

        check_memory(self, reference)


__all__ = ["MemoryManager", "ModelParts", "Placement", "bandwidths", "fits", "model_bytes", "plan_for"]
