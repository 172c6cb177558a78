"""The memory planner (pure): where each part of the model lives — GPU, CPU RAM or disk — under one placement mode,
what it costs in RAM and VRAM, and the decode ceiling of each tier; or a refusal that names the smallest fix.

Inputs are byte counts (per part, in the weight format the kernels plugin produces), the KV cache per position, the
context, the budgets and the machine's bandwidths; nothing here touches torch or the machine.

Modes (the memory plugins):
  cpu            every part resident in RAM
  cuda_full      every part in VRAM
  cuda_partial   the vision tower, then the leading decoder layers with their KV cache in VRAM; the rest computed on
                 the CPU (llama.cpp's -ngl). Only the hidden state crosses PCIe.
  ssd_stream     computed on the CPU; what does not fit the RAM budget stays on disk and is read into a small pool
                 ahead of compute, in this order of giving up residency: the embedding table (only the rows a
                 token uses are read), the vision tower (read once per image, block by block), decoder layers from
                 the last one back, the output head.
  cuda_offload_stream
                 every decoder layer computes on the GPU with its KV cache in VRAM; layers that do not stay in VRAM
                 live in pinned RAM (tier `pinned`) and are copied over the host link a layer ahead into a window of
                 `ahead + 1` layers. VRAM holds the window and every KV cache first, then (while they fit) the output
                 head (read every token), leading layers (fewer bytes over the link per token), the vision tower
                 (prefill), the embeddings (one row a token).
Decode time per token is bounded by the bytes each tier reads: t = max(max(t_gpu, t_link) + t_cpu, t_disk), with
streamed bytes also read from RAM by the CPU (the prefetcher reads ahead while any layer computes) and pinned bytes
also read by the GPU (their copies overlap the compute of the layer before).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qvl_pipeline.errors import ConfigError

GIB = 1024 ** 3
MODES = ("cpu", "cuda_full", "cuda_partial", "ssd_stream", "cuda_offload_stream")
TIERS = ("gpu", "cpu", "disk", "pinned")   # pinned: in pinned RAM, computed on the GPU (copied there when used)
ON_GPU = ("gpu", "pinned")                 # tiers whose layers compute on the GPU, with their KV cache in VRAM
DEFAULT_RESERVE_GB = 1.5   # RAM left to the OS and other programs when memory.ram_budget_gb is not set
VRAM_RESERVE_GB = 0.5      # VRAM for the CUDA context and activations when memory.vram_budget_gb is not set
# The process's own RAM besides weights and KV cache: Python + torch + tokenizer measured 0.24 GiB anonymous +
# 0.15 GiB of mapped libraries before any weight is touched (2B, int8), plus decode/prefill activations.
RUNTIME_GB = 0.4
ACTIVATIONS_GB = 0.1
CONTEXT_STEP = 1024        # a smaller max_context is suggested in steps of this many positions
STREAM_AHEAD = 1           # ssd_stream: units read ahead of the one computing (1 = double buffering)


@dataclass(frozen=True)
class ModelBytes:
    """Bytes of each part of the model in one weight format (`label`), and its KV cache per position per layer."""

    layers: tuple[int, ...]
    vision: int
    vision_block: int          # the largest vision block (the vision tower streams block by block)
    vision_depth: int
    embed: int
    head: int                  # 0: the output head is the embedding table itself (tied, not quantised)
    kv_per_position: int       # keys + values of one layer for one position
    label: str = ""

    @property
    def head_unit(self) -> int:
        """Bytes the head reads per token: its own weights, or the whole embedding table when tied."""
        return self.head or self.embed

    @property
    def vision_rest(self) -> int:
        return max(0, self.vision - self.vision_block * self.vision_depth)

    @property
    def weights(self) -> int:
        return sum(self.layers) + self.vision + self.embed + self.head

    def kv(self, positions: int) -> int:
        """KV cache of one layer at `positions`."""
        return self.kv_per_position * positions


@dataclass(frozen=True)
class MemoryKnobs:
    """The user's memory.* knobs (defaults in the config schema, MemorySlotConfig)."""

    ram_budget_gb: float | None = None
    vram_budget_gb: float | None = None
    reserve_gb: float = DEFAULT_RESERVE_GB


@dataclass(frozen=True)
class Budgets:
    """RAM and VRAM this run may fill (whole process in RAM; 0 VRAM = no usable GPU), where they come from, and the
    knobs they were derived with."""

    ram: int
    vram: int
    ram_source: str
    vram_source: str
    knobs: MemoryKnobs = MemoryKnobs()

    def to_dict(self) -> dict[str, Any]:
        return {"ram_gib": round(self.ram / GIB, 3), "ram_source": self.ram_source,
                "vram_gib": round(self.vram / GIB, 3), "vram_source": self.vram_source}


def derive_budgets(ram_gb: float, vram_gb: float | None, knobs: MemoryKnobs = MemoryKnobs()) -> Budgets:
    """The budgets in force: the `memory.*_budget_gb` knobs as given (VRAM never above the GPU's), else the
    machine's RAM minus `reserve_gb` and its VRAM minus VRAM_RESERVE_GB (pure). `vram_gb` None: no usable GPU."""
    if knobs.ram_budget_gb is not None:
        ram, ram_source = knobs.ram_budget_gb, f"memory.ram_budget_gb={knobs.ram_budget_gb:g}"
    else:
        ram = max(0.0, ram_gb - knobs.reserve_gb)
        ram_source = f"{ram_gb:g} GiB RAM - memory.reserve_gb={knobs.reserve_gb:g}"
    if vram_gb is None:
        vram, vram_source = 0.0, "no usable GPU"
    elif knobs.vram_budget_gb is not None:
        vram, vram_source = min(knobs.vram_budget_gb, vram_gb), f"memory.vram_budget_gb={knobs.vram_budget_gb:g}"
    else:
        vram = max(0.0, vram_gb - VRAM_RESERVE_GB)
        vram_source = f"{vram_gb:g} GiB VRAM - {VRAM_RESERVE_GB:g} GiB for the CUDA context"
    return Budgets(int(ram * GIB), int(vram * GIB), ram_source, vram_source, knobs)


@dataclass(frozen=True)
class Bandwidths:
    """GB/s (10^9 bytes) of each path; 0 = unknown (its ceiling is not stated)."""

    ram: float = 0.0
    disk: float = 0.0
    gpu: float = 0.0
    pcie: float = 0.0


@dataclass(frozen=True)
class MemoryPlan:
    """Where each part lives (tier per part), what that costs, and how fast decode can be."""

    mode: str
    vision: str
    embed: str
    head: str                       # the tier of the head's weights (the embedding's when tied)
    layers: tuple[str, ...]
    ram: int                        # bytes of RAM the run needs at most (weights, KV, pool, runtime)
    vram: int
    budgets: Budgets
    pool: int = 0                   # ssd_stream: bytes of the read-ahead pool (included in `ram`)
    window: int = 0                 # cuda_offload_stream: VRAM for the layers in flight (included in `vram`)
    kv: Mapping[str, int] = field(default_factory=dict)           # KV bytes per tier
    read_per_token: Mapping[str, int] = field(default_factory=dict)  # weight bytes each tier reads per token
    ceilings: Mapping[str, float | None] = field(default_factory=dict)  # tok/s if only that tier bounded decode
    ceiling: float | None = None    # tok/s, all tiers together
    positions: int = 0
    model: ModelBytes | None = None

    def tier_of(self, part: str) -> str:
        """`vision`, `embed`, `head` or `layers.N`."""
        if part.startswith("layers."):
            return self.layers[int(part.split(".", 1)[1])]
        return getattr(self, part)

    def layer_runs(self) -> list[tuple[int, int, str]]:
        """Consecutive decoder layers on the same tier: (first, last, tier)."""
        runs: list[tuple[int, int, str]] = []
        for i, tier in enumerate(self.layers):
            if runs and runs[-1][2] == tier:
                runs[-1] = (runs[-1][0], i, tier)
            else:
                runs.append((i, i, tier))
        return runs

    def to_dict(self) -> dict[str, Any]:
        def gib(n: int) -> float:
            return round(n / GIB, 3)
        model = self.model
        assert model is not None
        runs = [{"first": a, "last": b, "tier": t, "gib": gib(sum(model.layers[a:b + 1]))}
                for a, b, t in self.layer_runs()]
        return {
            "mode": self.mode, "weights": model.label, "positions": self.positions,
            "parts": {"vision": {"tier": self.vision, "gib": gib(model.vision)},
                      "embed": {"tier": self.embed, "gib": gib(model.embed), "is_head": not model.head},
                      "head": {"tier": self.head, "gib": gib(model.head_unit)}, "layers": runs},
            "ram_gib": gib(self.ram), "vram_gib": gib(self.vram), "pool_gib": gib(self.pool),
            "window_gib": gib(self.window),
            "runtime_gib": gib(workspace_bytes()),
            "budgets": self.budgets.to_dict(),
            "kv_gib": {t: gib(n) for t, n in self.kv.items()},
            "read_per_token_gib": {t: gib(n) for t, n in self.read_per_token.items()},
            "ceilings_tokens_per_s": {t: None if c is None else round(c, 2) for t, c in self.ceilings.items()},
            "ceiling_tokens_per_s": None if self.ceiling is None else round(self.ceiling, 2),
        }


def size(n: int) -> str:
    """Bytes for a message: GiB with two decimals from 1 GiB, MiB with one below."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


class DoesNotFit(Exception):
    """A mode's placement needs more than a budget holds (`memory` is ram or vram)."""

    def __init__(self, memory: str, need: int, have: int, detail: str) -> None:
        super().__init__(f"needs {size(need)} of {memory.upper()} ({detail}), the budget is {size(have)}")
        self.memory, self.need, self.have, self.detail = memory, need, have, detail


def workspace_bytes() -> int:
    """RAM of the process besides weights, KV cache and stream pool."""
    return int((RUNTIME_GB + ACTIVATIONS_GB) * GIB)


def _finish(mode: str, model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths, *, vision: str,
            embed: str, head: str, layers: tuple[str, ...], pool: int = 0, window: int = 0) -> MemoryPlan:
    """Totals, checks against the budgets, and the decode ceilings of a placement (raises DoesNotFit). `pool`: RAM
    of ssd_stream's read-ahead pool; `window`: VRAM of cuda_offload_stream's layers in flight."""
    kv_layer = model.kv(positions)
    weights = {t: 0 for t in TIERS}
    kv = {t: 0 for t in TIERS if t != "pinned"}     # a streamed layer's KV cache lives in VRAM
    read = {t: 0 for t in TIERS}
    for nbytes, tier in zip(model.layers, layers, strict=True):
        weights[tier] += nbytes
        read[tier] += nbytes
        kv["gpu" if tier in ON_GPU else "cpu"] += kv_layer
    weights[vision] += model.vision
    if model.head:
        weights[embed] += model.embed
        weights[head] += model.head
    else:
        weights[head] += model.embed          # tied: the embedding table is the head
    read[head] += model.head_unit
    ram = workspace_bytes() + weights["cpu"] + weights["pinned"] + kv["cpu"] + pool
    vram = weights["gpu"] + kv["gpu"] + window
    parts = f"{model.label} weights {size(weights['cpu'] + weights['pinned'])} + KV {size(kv['cpu'])} at " \
            f"{positions} positions"
    if pool:
        parts += f" + stream pool {size(pool)}"
    parts += f" + runtime {size(workspace_bytes())}"
    if vram > budgets.vram:
        in_flight = f" + layers in flight {size(window)}" if window else ""
        raise DoesNotFit("vram", vram, budgets.vram, f"{model.label} weights {size(weights['gpu'])} + KV "
                         f"{size(kv['gpu'])} at {positions} positions{in_flight}; {budgets.vram_source}")
    if ram > budgets.ram:
        raise DoesNotFit("ram", ram, budgets.ram, f"{parts}; {budgets.ram_source}")
    on_gpu = read["gpu"] + read["pinned"]
    ceilings = {"gpu": _rate(bw.gpu, on_gpu), "cpu": _rate(bw.ram, read["cpu"] + read["disk"]),
                "disk": _rate(bw.disk, read["disk"]), "pinned": _rate(bw.pcie, read["pinned"])}
    t_gpu, t_cpu = _seconds(bw.gpu, on_gpu), _seconds(bw.ram, read["cpu"] + read["disk"])
    t_disk, t_link = _seconds(bw.disk, read["disk"]), _seconds(bw.pcie, read["pinned"])
    total = None
    if None not in (t_gpu, t_cpu, t_disk, t_link):
        assert t_gpu is not None and t_cpu is not None and t_disk is not None and t_link is not None
        slowest = max(max(t_gpu, t_link) + t_cpu, t_disk)
        total = 1 / slowest if slowest > 0 else None
    shown = {t: c for t, c in ceilings.items()
             if read[t] or (t == "cpu" and read["disk"]) or (t == "gpu" and read["pinned"])}
    if not read["pinned"]:
        del read["pinned"]                           # only cuda_offload_stream has the tier
    return MemoryPlan(mode, vision, embed, head, layers, ram, vram, budgets, pool, window, kv, read, shown, total,
                      positions, model)


def _seconds(gb_s: float, nbytes: int) -> float | None:
    if not nbytes:
        return 0.0
    return nbytes / (gb_s * 1e9) if gb_s else None


def _rate(gb_s: float, nbytes: int) -> float | None:
    return gb_s * 1e9 / nbytes if gb_s and nbytes else None


def stream_pool(model: ModelBytes, layers: tuple[str, ...], head: str, vision: str, ahead: int = STREAM_AHEAD) -> int:
    """Bytes of the read-ahead pool: the largest window of `ahead + 1` consecutive streamed units of the decoder's
    cycle (streamed layers, then the head), or of the vision tower's (its non-block parts plus blocks), whichever
    is larger (the vision stream runs while the decoder's is idle)."""
    cycle = [nbytes for nbytes, tier in zip(model.layers, layers, strict=True) if tier == "disk"]
    if head == "disk":
        pieces = head_pieces(model.head_unit, model.layers)
        cycle += [math.ceil(model.head_unit / pieces)] * pieces
    tower = model.vision_rest + window_bytes([model.vision_block] * model.vision_depth, ahead, cyclic=False) \
        if vision == "disk" else 0
    return max(window_bytes(cycle, ahead, cyclic=True), tower)


def head_pieces(head_unit: int, layers: Sequence[int]) -> int:
    """How many row ranges a head streamed from disk is read in: about a decoder layer's bytes each, so it does not
    widen the pool."""
    largest = max(layers, default=0)
    return max(1, math.ceil(head_unit / largest)) if largest else 1


def window_bytes(units: list[int], ahead: int, cyclic: bool) -> int:
    """The most bytes `ahead + 1` consecutive units of a stream hold (wrapping around when `cyclic`)."""
    width = min(ahead + 1, len(units))
    starts = range(len(units)) if cyclic else range(len(units) - width + 1)
    return max((sum(units[(i + k) % len(units)] for k in range(width)) for i in starts), default=0)


def plan(mode: str, model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths, *,
         gpu_layers: int | None = None, resident_layers: int | None = None, ahead: int = STREAM_AHEAD) -> MemoryPlan:
    """The placement of `mode` (see the module's docstring); raises DoesNotFit when it exceeds a budget."""
    n = len(model.layers)
    if mode == "cpu":
        return _finish(mode, model, positions, budgets, bw, vision="cpu", embed="cpu", head="cpu",
                       layers=("cpu",) * n)
    if mode == "cuda_full":
        return _finish(mode, model, positions, budgets, bw, vision="gpu", embed="gpu", head="gpu",
                       layers=("gpu",) * n)
    if mode == "cuda_partial":
        return _plan_partial(model, positions, budgets, bw, gpu_layers)
    if mode == "ssd_stream":
        return _plan_stream(model, positions, budgets, bw, ahead, resident_layers)
    if mode == "cuda_offload_stream":
        return _plan_offload(model, positions, budgets, bw, ahead, resident_layers)
    raise ValueError(f"unknown memory mode {mode!r}; modes are {MODES}")


def _plan_partial(model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths,
                  gpu_layers: int | None) -> MemoryPlan:
    """Vision first (prefill is compute bound: the GPU's gain is largest there), then leading layers with their
    KV cache, then the head when every layer is on the GPU; the embedding table stays on the CPU (one row a token)."""
    n, vram = len(model.layers), budgets.vram
    vision = "gpu" if model.vision <= vram else "cpu"
    used = model.vision if vision == "gpu" else 0
    if gpu_layers is None:
        count = 0
        for nbytes in model.layers:
            if used + nbytes + model.kv(positions) > vram:
                break
            used += nbytes + model.kv(positions)
            count += 1
    else:
        count = max(0, min(gpu_layers, n))
        used += sum(model.layers[:count]) + count * model.kv(positions)
    head = "gpu" if count == n and model.head and used + model.head <= vram else "cpu"
    layers = tuple("gpu" if i < count else "cpu" for i in range(n))
    return _finish("cuda_partial", model, positions, budgets, bw, vision=vision, embed="cpu", head=head,
                   layers=layers)


def _plan_stream(model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths, ahead: int,
                 resident_layers: int | None) -> MemoryPlan:
    """Everything resident (or the first `resident_layers` layers only), then give up residency part by part (see
    the module docstring) until it fits."""
    n = len(model.layers)
    forced = n if resident_layers is None else max(0, min(resident_layers, n))
    tiers: dict[str, Any] = {"vision": "cpu", "embed": "cpu", "head": "cpu",
                             "layers": ["cpu" if i < forced else "disk" for i in range(n)]}
    order: list[tuple[str, int | None]] = ([("embed", None)] if model.head else []) + [("vision", None)]
    if resident_layers is None:
        order += [("layers", i) for i in reversed(range(n))]
    order += [("head", None)]
    last: DoesNotFit | None = None
    for step in [None, *order]:
        if step is not None:
            name, index = step
            if index is None:
                tiers[name] = "disk"
            else:
                tiers[name][index] = "disk"
        if not model.head:
            tiers["embed"] = tiers["head"]
        layers = tuple(tiers["layers"])
        pool = stream_pool(model, layers, tiers["head"], tiers["vision"], ahead)
        try:
            return _finish("ssd_stream", model, positions, budgets, bw, vision=tiers["vision"], embed=tiers["embed"],
                           head=tiers["head"], layers=layers, pool=pool)
        except DoesNotFit as exc:
            last = exc
    assert last is not None
    raise last


def offload_window(layers: Sequence[int], resident: int, ahead: int = STREAM_AHEAD) -> int:
    """VRAM for cuda_offload_stream's layers in flight: `ahead + 1` copies of the largest layer beyond the first
    `resident` (the one computing and the ones being copied; the last layer already copies the first streamed one
    for the next token), 0 when every layer stays in VRAM."""
    streamed = layers[resident:]
    return (ahead + 1) * max(streamed) if streamed else 0


def _plan_offload(model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths, ahead: int,
                  resident_layers: int | None) -> MemoryPlan:
    """VRAM holds every layer's KV cache and the layers in flight; then, while they fit, the head, the most leading
    layers kept resident (or exactly `resident_layers`), the vision tower and the embeddings (see the module's
    docstring). What does not stay in VRAM stays in (pinned) RAM."""
    n, vram = len(model.layers), budgets.vram
    used = n * model.kv(positions)
    head = "gpu" if used + offload_window(model.layers, 0, ahead) + model.head_unit <= vram else "cpu"
    used += model.head_unit if head == "gpu" else 0
    if resident_layers is None:
        count = max((c for c in range(n + 1)
                     if used + sum(model.layers[:c]) + offload_window(model.layers, c, ahead) <= vram), default=0)
    else:
        count = max(0, min(resident_layers, n))
    window = offload_window(model.layers, count, ahead)
    used += sum(model.layers[:count]) + window
    vision = "gpu" if used + model.vision <= vram else "cpu"
    used += model.vision if vision == "gpu" else 0
    embed = head if not model.head else "gpu" if used + model.embed <= vram else "cpu"
    layers = tuple("gpu" if i < count else "pinned" for i in range(n))
    return _finish("cuda_offload_stream", model, positions, budgets, bw, vision=vision, embed=embed, head=head,
                   layers=layers, window=window)


def fixes(mode: str, model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths,
          alternatives: Mapping[str, ModelBytes], memory: str = "ram", **kwargs: Any) -> list[str]:
    """What would make `mode` fit the `memory` ("ram" or "vram") it exceeds, in this order: a smaller weight format
    (`alternatives`: label -> bytes, e.g. int4 via opt=aggressive), a smaller context, memory=ssd_stream (with its
    expected speed)."""
    found = []
    for label, alt in alternatives.items():
        try:
            fitted = plan(mode, alt, positions, budgets, bw, **kwargs)
        except DoesNotFit:
            continue
        need = fitted.vram if memory == "vram" else fitted.ram
        found.append(f"use {label}: {size(alt.weights)} of weights, {size(need)} of {memory.upper()} in all")
        break
    for smaller in range((positions - 1) // CONTEXT_STEP * CONTEXT_STEP, 0, -CONTEXT_STEP):
        try:
            plan(mode, model, smaller, budgets, bw, **kwargs)
        except DoesNotFit:
            continue
        found.append(f"lower generate.max_context to {smaller}")
        break
    if mode != "ssd_stream":
        try:
            streamed = plan("ssd_stream", model, positions, budgets, bw)
        except DoesNotFit:
            pass
        else:
            speed = (f"~{streamed.ceiling:.1f} tok/s at most" if streamed.ceiling
                     else "speed unknown: add hardware.measure=true")
            found.append(f"use memory=ssd_stream ({speed}, "
                         f"{size(streamed.read_per_token['disk'])} read from disk per token)")
    return found


def plan_or_refuse(mode: str, model: ModelBytes, positions: int, budgets: Budgets, bw: Bandwidths, *,
                   alternatives: Mapping[str, ModelBytes] | None = None, **kwargs: Any) -> MemoryPlan:
    """`plan`, or a ConfigError saying what does not fit and the fixes that work, smallest first."""
    try:
        return plan(mode, model, positions, budgets, bw, **kwargs)
    except DoesNotFit as exc:
        found = fixes(mode, model, positions, budgets, bw, alternatives or {}, exc.memory, **kwargs)
        knob = "memory.vram_budget_gb" if exc.memory == "vram" else "memory.ram_budget_gb"
        found.append(f"free memory or raise {knob} to {math.ceil(exc.need / GIB * 100) / 100:g}")
        raise ConfigError(f"memory={mode} does not fit: {exc}", "; or ".join(found)) from None

