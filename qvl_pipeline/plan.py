"""The run's plan: facts used, plugin per slot with every rejection, model sizes and bandwidth ceilings."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.facts import RunFacts
from qvl_pipeline.hardware.build import HardwareReport
from qvl_pipeline.memory_plan import MODES, derive_budgets
from qvl_pipeline.model.sizing import FORMAT_BYTES
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.slots import CacheShape, KernelsBackend, KVCacheBackend, MemoryManager, Placement
from qvl_pipeline.slots.kernels import dtype_name
from qvl_pipeline.slots.memory import model_bytes, plan_for
from qvl_pipeline.slots.memory_share import layer_devices_summary

GIB = 1024 ** 3


def kv_section(facts: RunFacts, backend: KVCacheBackend, layer_devices: Sequence[str],
               dtype: torch.dtype) -> dict[str, Any]:
    """Where each layer's KV cache lives, its storage format, and its size per position and at the full context."""
    text = facts.model.config.text
    positions = facts.context.positions
    shape = CacheShape(layers=text.num_hidden_layers, batch=1, kv_heads=text.num_key_value_heads,
                       head_dim=text.head_dim, max_len=positions)
    per_position = backend.bytes_per_position(shape, dtype)
    return {"plugin": backend.name, "format": backend.storage(dtype), "placement": layer_devices_summary(layer_devices),
            "bytes_per_position": per_position, "gib_at_context": round(per_position * positions / GIB, 6)}


def predicted_placement(facts: RunFacts, memory: MemoryManager) -> Placement:
    """Where the run's model would compute, predicted before loading: the planner's placement when the memory plugin
    follows it (streamed layers on the device they compute on), else its own `place` on the sizes in the chosen
    kernels plugin's weight format."""
    memory_plan = memory.plan()
    if memory_plan is not None:
        return Placement.from_plan(memory_plan, computing=True)
    sizes = model_bytes(memory.facts)
    return memory.place(list(sizes.layers), sizes.vision, sizes.embed, sizes.head)


def model_section(facts: RunFacts, memory: MemoryManager) -> dict[str, Any]:
    """The model the run loads (from its real config), its weight bytes per format with the CPU decode ceiling,
    and where each part would live: the memory planner's placement (tier, bytes, budgets, ceilings per tier) when
    the memory plugin follows it."""
    model = facts.model
    counts = model.params
    per_token = counts.read_per_token
    bandwidth = facts.hardware.cpu.memory_bandwidth_gb_s
    formats = {}
    for fmt, nbytes in FORMAT_BYTES.items():
        ceiling = bandwidth * 1e9 / (per_token * nbytes) if bandwidth else None
        formats[fmt] = {"total_gib": round(counts.total * nbytes / GIB, 6),
                        "read_per_token_gib": round(per_token * nbytes / GIB, 6),
                        "cpu_ceiling_tokens_per_s": round(ceiling, 2) if ceiling else None}
    memory_plan = memory.plan()
    placement = predicted_placement(facts, memory)
    return {"source": model.source, "folder": str(model.folder) if model.folder else None, "demo": model.demo,
            "dtype": model.stored_dtype,
            "parameters": {"vision": counts.vision, "text": counts.text, "total": counts.total,
                           "decoder_layers": counts.layers},
            "weights_by_format": formats, "placement": placement.summary(),
            "memory": None if memory_plan is None else memory_plan.to_dict()}


def described_memory(report: HardwareReport, memory: MemoryManager, explicit: bool,
                     rejects: Callable[[str, RunFacts], list[str]]) -> dict[str, Any] | None:
    """The memory plan on the named profile's own machine when its GPU is not usable here (this machine plans for
    the CPU): the explicitly chosen plugin's, else the first entry of the profile's memory chain that its plugin's
    `rejects(name, facts there)` admits and that fits there (built-in plugins are named after the planner's modes),
    with the weight format chosen here."""
    described = report.described
    if described is None or described.gpu is None or not described.cuda_usable or memory.facts.hardware.cuda_usable:
        return None
    budgets = derive_budgets(described.ram_gb, described.gpu.vram_gb, memory.facts.memory_budgets.knobs)
    there = replace(memory.facts, hardware=described, budgets=budgets)
    names = (memory.mode,) if explicit and memory.mode else described.chains.get("memory", ())
    for name in names:
        if name not in MODES or rejects(name, there):
            continue
        try:
            return {"profile": described.name, **plan_for(there, name).to_dict()}
        except ConfigError:
            continue
    return None


class RunPlan:
    """Everything the run decided and why — built once per run from the facts and the resolver; its slots
    section reads the resolver's live decisions, so runtime fallbacks appear without patching."""

    def __init__(self, report: HardwareReport, facts: RunFacts, resolver: Resolver, opt_level: str) -> None:
        self.report = report
        self.facts = facts
        self.resolver = resolver
        self.opt_level = opt_level
        self.recoveries: list[dict[str, str]] = []      # what the runtime did after failures while running

    def _memory_rejects(self, name: str, facts: RunFacts) -> list[str]:
        """Why memory plugin `name` (with the run's options when it is the chosen one) cannot run with `facts`."""
        memory = self.resolver.resolve("memory")
        spec = self.resolver.registry.load("memory", name)
        options = memory.options if memory.name == name else spec.cls.Options()
        return list(spec.cls.validate(facts, options))

    def record_recovery(self, where: str, failure: str, action: str) -> None:
        """Note a runtime recovery: the step that failed, the failure, and what was changed to go on."""
        self.recoveries.append({"where": where, "failure": failure, "action": action})

    def to_dict(self, loaded: Any = None) -> dict[str, Any]:
        """The plan as plain data; `loaded` (a LoadedModel) adds what loading measured and the real placement."""
        slots = self.resolver.plan()
        memory = self.resolver.resolve("memory")
        assert isinstance(memory, MemoryManager)
        model = model_section(self.facts, memory)
        explicit = self.resolver.decisions["memory"].how == "explicit"
        model["memory_on_profile"] = described_memory(self.report, memory, explicit, self._memory_rejects)
        kv_backend = self.resolver.resolve("kv_cache")
        assert isinstance(kv_backend, KVCacheBackend)
        kernels = self.resolver.resolve("kernels")
        assert isinstance(kernels, KernelsBackend)
        compute = kernels.compute(getattr(torch, self.facts.model.stored_dtype))
        model["compute"] = {"dtype": dtype_name(compute.dtype), "reason": compute.reason}
        if loaded is not None:
            model["loaded"] = {"report": str(loaded.report), "seconds": round(loaded.seconds, 3),
                               "placement": loaded.placement.summary(), "decode_step": loaded.decode_step}
            kv = kv_section(self.facts, kv_backend, loaded.placement.layers, loaded.model.dtype)
        else:       # before loading: the dtype the loaded model will compute in (the run's activation_dtype)
            dtype = getattr(torch, self.facts.activation_dtype)
            kv = kv_section(self.facts, kv_backend, predicted_placement(self.facts, memory).layers, dtype)
        context = self.facts.context
        return {
            "hardware": self.report.to_dict(),
            "opt": {"level": self.opt_level, "max_fidelity": self.resolver.ceiling.name.lower()},
            "slots": slots,
            "model": model,
            "context": {"positions": context.positions, "reason": context.reason},
            "kv_cache": kv,
            "runtime_recoveries": list(self.recoveries),
            "processing": {"max_pixels": self.facts.pixels.max_pixels, "max_pixels_source": self.facts.pixels.reason},
            "registry_problems": list(self.resolver.registry.problems),
        }


def _rate(value: float, unit: str) -> str:
    return f"{value:g} {unit}" if value else "unmeasured"


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


_TIER_NOTES = {"gpu": "in VRAM", "cpu": "in RAM", "disk": "on disk, read when used",
               "pinned": "in pinned RAM, copied to the GPU a layer ahead"}


def _ceiling(rate: float | None) -> str:
    return f"{rate:.1f} tok/s" if rate else "n/a (add hardware.measure=true)"


def render_memory(mem: Mapping[str, Any], where: str = "") -> list[str]:
    """The memory planner's placement: each part's tier and size, RAM/VRAM against the budgets, decode ceilings."""
    parts = mem["parts"]
    b = mem["budgets"]
    lines = [f"  memory plan{where} (memory={mem['mode']}, {mem['weights']} weights, KV for {mem['positions']} "
             "positions):"]
    vision, embed, head = parts["vision"], parts["embed"], parts["head"]
    lines.append(f"    {'vision tower':<18}{vision['tier']:<6}{_size(vision['gib']):>10}  "
                 + ("read block by block for each image" if vision["tier"] == "disk" else _TIER_NOTES[vision["tier"]]))
    if not embed["is_head"]:
        lines.append(f"    {'embeddings':<18}{embed['tier']:<6}{_size(embed['gib']):>10}  "
                     + ("rows read as tokens use them" if embed["tier"] == "disk" else _TIER_NOTES[embed["tier"]]))
    for run in parts["layers"]:
        name = f"layer {run['first']}" if run["first"] == run["last"] else f"layers {run['first']}-{run['last']}"
        note = "streamed from disk ahead of compute" if run["tier"] == "disk" else _TIER_NOTES[run["tier"]]
        lines.append(f"    {name:<18}{run['tier']:<6}{_size(run['gib']):>10}  {note}")
    head_name = "head (embedding)" if embed["is_head"] else "output head"
    lines.append(f"    {head_name:<18}{head['tier']:<6}{_size(head['gib']):>10}  "
                 + ("streamed from disk each token" if head["tier"] == "disk" else _TIER_NOTES[head["tier"]]))
    kv = mem["kv_gib"]
    lines.append(f"    RAM {_size(mem['ram_gib'])} of {_size(b['ram_gib'])} ({b['ram_source']}): KV cache "
                 f"{_size(kv.get('cpu', 0))}, runtime {_size(mem['runtime_gib'])}"
                 + (f", stream pool {_size(mem['pool_gib'])}" if mem["pool_gib"] else ""))
    if mem["vram_gib"] or b["vram_gib"]:
        lines.append(f"    VRAM {_size(mem['vram_gib'])} of {_size(b['vram_gib'])} ({b['vram_source']}): KV cache "
                     f"{_size(kv.get('gpu', 0))}"
                     + (f", layers in flight {_size(mem['window_gib'])}" if mem["window_gib"] else ""))
    read = mem["read_per_token_gib"]
    pinned = read.get("pinned", 0)
    read_by = {"cpu": read["cpu"] + read["disk"], "gpu": read["gpu"] + pinned, "pinned": pinned, "disk": read["disk"]}
    tiers = [f"{'host link' if tier == 'pinned' else tier} {rate:.1f} tok/s over {_size(read_by[tier])}/token"
             for tier, rate in mem["ceilings_tokens_per_s"].items() if rate]
    lines.append(f"    decode ceiling: {_ceiling(mem['ceiling_tokens_per_s'])}"
                 + (f" ({', '.join(tiers)})" if tiers else ""))
    return lines


def render_plan(plan: Mapping[str, Any]) -> str:
    """Human-readable plan text."""
    hw = plan["hardware"]
    facts = hw["facts"]
    cpu, gpu = facts["cpu"], facts["gpu"]
    model = plan["model"]
    lines = [f"== plan: hardware={hw['target']} opt={plan['opt']['level']} "
             f"(admits up to {plan['opt']['max_fidelity']}); model: {model['source']} =="]
    lines.append("facts used" + (" (probed on this machine)" if hw["probed"] else "") +
                 (" [emulating the profile's limits]" if hw["emulate"] else "") + ":")
    lines.append(f"  cpu: {cpu['model']} — {cpu['physical_cores']} cores / {cpu['threads']} threads, "
                 f"ISA {' '.join(cpu['isa']) or 'baseline'}, L2 {cpu['l2_kb']} KiB, L3 {cpu['l3_kb']} KiB, "
                 f"RAM bandwidth {_rate(cpu['memory_bandwidth_gb_s'], 'GB/s')}")
    lines.append(f"  ram: {facts['ram_gb']:g} GiB; storage: {facts['storage']['kind']} "
                 f"{_rate(facts['storage']['read_mb_s'], 'MB/s')}")
    if gpu:
        sm = "".join(str(x) for x in gpu["compute_capability"])
        kernels = {True: "yes", False: "NO", None: "unknown"}[gpu["torch_has_kernels"]]
        lines.append(f"  gpu: {gpu['name']} sm_{sm}, {gpu['vram_gb']:g} GiB VRAM; torch kernels: {kernels}")
    else:
        lines.append("  gpu: none usable")
    threads = hw.get("threads")
    if threads:
        bound = ("bound one per physical core (OMP_PLACES=cores)" if threads["pinned"]
                 else "not bound to cores (hardware.pin_threads=true binds them)")
        lines.append(f"  threads: {threads['compute']} compute ({threads['why']}), {threads['interop']} inter-op; "
                     f"{bound}")
    for diff in hw["differences"]:
        lines.append(f"  differs: {diff}")
    for note in hw["notes"]:
        lines.append(f"  note: {note}")
    for measured in facts["tuned"]:
        lines.append(f"  tuned: {measured}")
    lines.append("slots:")
    for slot, decision in plan["slots"].items():
        how = "explicit choice" if decision["how"] == "explicit" else f"chain {decision['candidates']}"
        origin = "" if decision["origin"].endswith("(built-in)") else f" from {decision['origin']}"
        lines.append(f"  {slot:<9} -> {decision['chosen']} [{decision['fidelity']}]{origin} via {how}")
        lines.append(f"  {'':<9}    {decision['summary']}")
        for rejection in decision["rejected"]:
            lines.append(f"  {'':<9}    rejected {rejection['plugin']}: {'; '.join(rejection['reasons'])}")
    p = model["parameters"]
    lines.append(f"model: {model['source']}, {model['dtype']}: {p['total'] / 1e6:,.1f} M parameters "
                 f"(vision {p['vision'] / 1e6:,.1f} M, text {p['text'] / 1e6:,.1f} M, "
                 f"{p['decoder_layers']} decoder layers)")
    compute = model["compute"]
    lines.append(f"  compute dtype: {compute['dtype']}: {compute['reason']}")
    loaded = model.get("loaded")
    lines.append(f"  placement: {loaded['placement'] if loaded else model['placement']}")
    if model.get("memory"):
        lines.extend(render_memory(model["memory"]))
    there = model.get("memory_on_profile")
    if there:
        lines.extend(render_memory(there, f" on {there['profile']} as described (its GPU is not usable here)"))
    if loaded:
        lines.append(f"  loaded: {loaded['report']}")
        lines.append(f"  decode step: {loaded['decode_step']}")
    lines.append(f"  {'weights by format':<28}{'total':>12}{'read/token':>12}   CPU decode ceiling")
    for fmt, row in model["weights_by_format"].items():
        ceiling = row["cpu_ceiling_tokens_per_s"]
        lines.append(f"    {fmt:<26}{_size(row['total_gib']):>12}{_size(row['read_per_token_gib']):>12}   "
                     + (f"{ceiling:.1f} tok/s" if ceiling else "n/a (add hardware.measure=true)"))
    lines.append(f"context: {plan['context']['positions']} positions ({plan['context']['reason']})")
    kv = plan["kv_cache"]
    lines.append(f"kv cache: {kv['format']}; {kv['placement']}; {kv['bytes_per_position'] / 1024:.1f} KiB per "
                 f"position, {_size(kv['gib_at_context'])} at the full context")
    for event in plan["runtime_recoveries"]:
        lines.append(f"  recovered at {event['where']}: {event['failure']} -> {event['action']}")
    proc = plan["processing"]
    lines.append(f"images: max_pixels {proc['max_pixels'] or 'uncapped'} ({proc['max_pixels_source']})")
    for problem in plan["registry_problems"]:
        lines.append(f"warning: {problem}")
    return "\n".join(lines)
