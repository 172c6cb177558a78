"""The run's plan: facts used, plugin per slot with every rejection, model sizes and bandwidth ceilings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qvl_pipeline.hardware.build import HardwareReport
from qvl_pipeline.model.sizing import FORMAT_BYTES, count_params
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.slots import MemoryManager

GIB = 1024 ** 3


def pixel_budget(cfg: Mapping[str, Any], report: HardwareReport) -> tuple[int | None, str]:
    """The max_pixels cap in force and where it comes from (pure)."""
    override = cfg.get("processing", {}).get("max_pixels")
    if override:
        return int(override), "processing.max_pixels override"
    budget = report.profile.budgets.get("max_pixels")
    if budget and cfg.get("opt", {}).get("use_budgets", True):
        return int(budget), f"hardware profile {report.target} budget"
    return None, "checkpoint's preprocessor_config (no cap)"


def model_section(cfg: Mapping[str, Any], report: HardwareReport, memory: MemoryManager) -> dict[str, Any]:
    model = cfg.get("model", {})
    hf = model.get("hf_config") or {}
    if not hf:
        return {"name": model.get("name"), "path": model.get("path")}
    counts = count_params(hf)
    per_token = counts.read_per_token
    bandwidth = report.profile.cpu.memory_bandwidth_gb_s
    formats = {}
    for fmt, nbytes in FORMAT_BYTES.items():
        ceiling = bandwidth * 1e9 / (per_token * nbytes) if bandwidth else None
        formats[fmt] = {"total_gib": round(counts.total * nbytes / GIB, 6),
                        "read_per_token_gib": round(per_token * nbytes / GIB, 6),
                        "cpu_ceiling_tokens_per_s": round(ceiling, 2) if ceiling else None}
    stored = 4 if model.get("dtype") == "float32" else 2
    placement = memory.place([counts.per_layer * stored] * counts.layers, counts.vision * stored,
                             counts.embed * stored, counts.head * stored)
    return {"name": model.get("name"), "path": model.get("path"), "demo": bool(model.get("demo")),
            "dtype": model.get("dtype"),
            "parameters": {"vision": counts.vision, "text": counts.text, "total": counts.total,
                           "decoder_layers": counts.layers},
            "weights_by_format": formats, "placement": placement.summary()}


def build_plan(cfg: Mapping[str, Any], report: HardwareReport, resolver: Resolver) -> dict[str, Any]:
    """Everything the run decided and why, as plain data (printed and saved with the outputs)."""
    slots = resolver.plan()
    memory = resolver.resolve("memory")
    assert isinstance(memory, MemoryManager)
    max_pixels, source = pixel_budget(cfg, report)
    return {
        "hardware": report.to_dict(),
        "opt": {"level": cfg.get("opt", {}).get("level"), "max_fidelity": resolver.ceiling.name.lower()},
        "slots": slots,
        "model": model_section(cfg, report, memory),
        "processing": {"max_pixels": max_pixels, "max_pixels_source": source},
        "registry_problems": list(resolver.registry.problems),
    }


def _rate(value: float, unit: str) -> str:
    return f"{value:g} {unit}" if value else "unmeasured"


def _size(gib: float) -> str:
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def render_plan(plan: Mapping[str, Any]) -> str:
    """Human-readable plan text."""
    hw = plan["hardware"]
    facts = hw["facts"]
    cpu, gpu = facts["cpu"], facts["gpu"]
    lines = [f"== plan: hardware={hw['target']} opt={plan['opt']['level']} "
             f"(admits up to {plan['opt']['max_fidelity']}) model={plan['model'].get('name')} =="]
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
    for diff in hw["differences"]:
        lines.append(f"  differs: {diff}")
    for note in hw["notes"]:
        lines.append(f"  note: {note}")
    lines.append("slots:")
    for slot, decision in plan["slots"].items():
        how = "explicit choice" if decision["how"] == "explicit" else f"chain {decision['candidates']}"
        lines.append(f"  {slot:<9} -> {decision['chosen']} [{decision['fidelity']}] via {how}")
        lines.append(f"  {'':<9}    {decision['summary']}")
        for rejection in decision["rejected"]:
            lines.append(f"  {'':<9}    rejected {rejection['plugin']}: {'; '.join(rejection['reasons'])}")
    model = plan["model"]
    if "parameters" in model:
        p = model["parameters"]
        lines.append(f"model: {model['name']}{' (demo weights)' if model['demo'] else ''}, "
                     f"{p['total'] / 1e6:,.1f} M parameters (vision {p['vision'] / 1e6:,.1f} M, text "
                     f"{p['text'] / 1e6:,.1f} M, {p['decoder_layers']} decoder layers)")
        lines.append(f"  placement: {model['placement']}")
        lines.append(f"  {'weights by format':<28}{'total':>12}{'read/token':>12}   CPU decode ceiling")
        for fmt, row in model["weights_by_format"].items():
            ceiling = row["cpu_ceiling_tokens_per_s"]
            lines.append(f"    {fmt:<26}{_size(row['total_gib']):>12}{_size(row['read_per_token_gib']):>12}   "
                         + (f"{ceiling:.1f} tok/s" if ceiling else "n/a (add hardware.measure=true)"))
    proc = plan["processing"]
    lines.append(f"images: max_pixels {proc['max_pixels'] or 'uncapped'} ({proc['max_pixels_source']})")
    for problem in plan["registry_problems"]:
        lines.append(f"warning: {problem}")
    return "\n".join(lines)
