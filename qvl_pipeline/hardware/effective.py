"""Reconcile a named target profile with the machine actually running, and emulate the target's limits."""

from __future__ import annotations

import os
from dataclasses import replace

from qvl_pipeline.hardware.profile import CpuFacts, HardwareProfile

# ATen's CPU dispatch levels and oneDNN's ISA caps, from the widest ISA a profile allows.
_ATEN_LEVELS = (("avx512f", "avx512"), ("avx2", "avx2"))
_ONEDNN_LEVELS = (("amx_bf16", "AVX512_CORE_AMX"), ("avx512_bf16", "AVX512_CORE_BF16"),
                  ("avx512_vnni", "AVX512_CORE_VNNI"), ("avx512f", "AVX512_CORE"), ("avx2", "AVX2"))


def reconcile(target: HardwareProfile, real: HardwareProfile, emulate: bool) -> tuple[HardwareProfile, list[str]]:
    """The facts resolution may rely on, and each way the target differs from this machine (pure).

    Never more than the machine has: a GPU or ISA flag the machine lacks is dropped. With `emulate`, also never
    more than the target has: threads, RAM, VRAM and ISA are capped to the profile.
    """
    diffs: list[str] = []
    missing_isa = [f for f in target.cpu.isa if f not in real.cpu.isa]
    if missing_isa:
        diffs.append(f"profile CPU has {', '.join(missing_isa)}; this CPU ({real.cpu.model}) does not")
    extra_isa = [f for f in real.cpu.isa if f not in target.cpu.isa]
    isa = tuple(f for f in real.cpu.isa if f in target.cpu.isa) if emulate else real.cpu.isa
    if extra_isa and emulate:
        diffs.append(f"emulating: {', '.join(extra_isa)} of this CPU disabled")
    cores, threads, ram = real.cpu.physical_cores, real.cpu.threads, real.ram_gb
    if (target.cpu.physical_cores, target.cpu.threads) != (cores, threads):
        diffs.append(f"profile CPU has {target.cpu.physical_cores} cores / {target.cpu.threads} threads; "
                     f"this one {cores} / {threads}")
    if emulate:
        cores, threads = min(cores, target.cpu.physical_cores), min(threads, target.cpu.threads)
    if abs(target.ram_gb - ram) > 0.5:
        diffs.append(f"profile RAM {target.ram_gb:g} GiB; this machine {ram:g} GiB")
    if emulate:
        ram = min(ram, target.ram_gb)
    bandwidth = real.cpu.memory_bandwidth_gb_s or (
        target.cpu.memory_bandwidth_gb_s if target.cpu.model == real.cpu.model or emulate else 0.0)
    cpu = CpuFacts(model=real.cpu.model, physical_cores=cores, threads=threads, isa=isa,
                   l2_kb=real.cpu.l2_kb, l3_kb=real.cpu.l3_kb, memory_bandwidth_gb_s=bandwidth)

    gpu = None
    if target.gpu is not None and real.gpu is None:
        diffs.append(f"profile GPU {target.gpu.name} (sm_{target.gpu.sm}); this machine has no CUDA GPU usable "
                     "by torch: CUDA entries of the chains are rejected")
    elif target.gpu is None and real.gpu is not None:
        diffs.append(f"profile has no GPU; this machine's {real.gpu.name} stays unused")
    elif target.gpu is not None and real.gpu is not None:
        gpu = real.gpu
        if real.gpu.compute_capability != target.gpu.compute_capability or real.gpu.name != target.gpu.name:
            diffs.append(f"profile GPU {target.gpu.name} (sm_{target.gpu.sm}); this one {real.gpu.name} "
                         f"(sm_{real.gpu.sm})")
        if emulate:
            gpu = replace(gpu, vram_gb=min(gpu.vram_gb, target.gpu.vram_gb))
    storage = real.storage if real.storage.read_mb_s else replace(real.storage, read_mb_s=target.storage.read_mb_s)
    if real.storage.kind not in ("unknown", target.storage.kind):
        diffs.append(f"profile storage {target.storage.kind}; the model's disk here is {real.storage.kind}")
    effective = replace(target, cpu=cpu, ram_gb=ram, gpu=gpu, storage=storage, probed=False)
    return effective, diffs


def emulation_env(profile: HardwareProfile) -> dict[str, str]:
    """Environment variables that cap ATen's and oneDNN's CPU ISA to what `profile` allows (pure)."""
    aten = next((level for flag, level in _ATEN_LEVELS if profile.has_isa(flag)), "default")
    onednn = next((level for flag, level in _ONEDNN_LEVELS if profile.has_isa(flag)), "SSE41")
    return {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}


def emulation_pending(profile: HardwareProfile) -> dict[str, str]:
    """The emulation variables not yet in force in this process's environment."""
    return {k: v for k, v in emulation_env(profile).items() if os.environ.get(k) != v}


def apply_threads(profile: HardwareProfile) -> int:
    """Use one compute thread per physical core of the (effective) profile; returns the count."""
    import torch

    threads = max(1, profile.cpu.physical_cores)
    torch.set_num_threads(threads)
    return threads
