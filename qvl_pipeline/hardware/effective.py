"""Reconcile a named target profile with the machine actually running, and emulate the target's limits."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

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


OMP_ENV = "OMP_NUM_THREADS"       # a user's thread count for OpenMP programs; torch reads it too
INTEROP_THREADS = 1               # the pipeline launches no inter-op work (no torch.jit.fork, no async ops)
PIN_ENV = {"OMP_PLACES": "cores", "OMP_PROC_BIND": "close"}   # read by OpenMP when it starts (torch's import)


@dataclass(frozen=True)
class ThreadPlan:
    """The run's threads: compute (torch's intra-op pool, which the native kernels share), inter-op, and whether
    OpenMP binds them to cores; `why` says where the compute count came from."""

    compute: int
    interop: int
    pinned: bool
    why: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def thread_plan(profile: HardwareProfile, threads: int | None, pin: bool, omp_threads: str | None = None,
                emulate: bool = False) -> ThreadPlan:
    """Threads for `profile` (the effective one) with the hardware group's `threads` and `pin_threads`; without
    `threads`, the environment's OMP_NUM_THREADS (`omp_threads`, as torch itself would) when it is a count. When
    emulating, never more than the profile's physical cores (pure)."""
    cores = max(1, profile.cpu.physical_cores)
    if threads is None and omp_threads and omp_threads.strip().isdigit() and int(omp_threads) >= 1:
        threads, source = int(omp_threads), "OMP_NUM_THREADS"
    elif threads is None:
        return ThreadPlan(cores, INTEROP_THREADS, pin, f"one per physical core, of {cores}")
    else:
        source = "hardware.threads"
    if emulate and threads > cores:
        return ThreadPlan(cores, INTEROP_THREADS, pin, f"{source}={threads} capped to the emulated profile's {cores} "
                                                       "physical cores")
    why = source + ("" if threads == cores else f"; the CPU has {cores} physical cores")
    return ThreadPlan(threads, INTEROP_THREADS, pin, why)


def emulation_env(profile: HardwareProfile) -> dict[str, str]:
    """Environment variables that cap ATen's and oneDNN's CPU ISA to what `profile` allows (pure)."""
    aten = next((level for flag, level in _ATEN_LEVELS if profile.has_isa(flag)), "default")
    onednn = next((level for flag, level in _ONEDNN_LEVELS if profile.has_isa(flag)), "SSE41")
    return {"ATEN_CPU_CAPABILITY": aten, "ONEDNN_MAX_CPU_ISA": onednn}


def process_env(profile: HardwareProfile, emulate: bool, threads: ThreadPlan | None) -> dict[str, str]:
    """The environment a run needs before torch starts: the ISA caps when emulating, the OpenMP binding when the
    threads are pinned (pure)."""
    env = emulation_env(profile) if emulate else {}
    if threads is not None and threads.pinned:
        env.update(PIN_ENV)
    return env


def env_pending(env: dict[str, str]) -> dict[str, str]:
    """The variables of `env` not yet in force in this process's environment."""
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def apply_threads(plan: ThreadPlan) -> None:
    """Set torch's compute and inter-op thread counts. The inter-op count can be set once per process, before any
    inter-op work: a later pipeline in the same process keeps the first one's."""
    import torch

    torch.set_num_threads(plan.compute)
    if torch.get_num_interop_threads() != plan.interop:
        try:
            torch.set_num_interop_threads(plan.interop)
        except RuntimeError:
            pass
