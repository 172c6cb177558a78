"""Fallback chains derived from a machine's facts: what `hardware=auto` uses, and what a named profile falls back
to when its GPU is not usable here (the CPU order, never the GPU order with the CUDA entries struck out)."""

from __future__ import annotations

from qvl_pipeline.hardware.profile import HardwareProfile

Chains = dict[str, tuple[str, ...]]


def native_bf16(hw: HardwareProfile) -> bool:
    """The CPU computes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere ATen emulates them, slowly."""
    return hw.has_isa("avx512_bf16") or hw.has_isa("amx_bf16")


def cpu_chains(hw: HardwareProfile) -> Chains:
    """Per-slot chains for computing on this CPU, fastest first (the opt level's fidelity ceiling then strikes
    what it does not admit: int4 at moderate, int8 weights and the int8 KV cache at minimal)."""
    # Decode is bandwidth bound: fewest bytes per token first. Where bf16 is native the stored dtype is the
    # fast exact path; elsewhere fp32 compute is (it validates only when the fp32 copy fits in RAM).
    exact = ("torch_native", "fp32_compute") if native_bf16(hw) else ("fp32_compute", "torch_native")
    # int4 first on every vector ISA: the project's native int4 x int8 GEMV has an AVX2 path (vpmaddubsw), and
    # with it int4 decodes faster than int8 there too (2B, 2 threads, AVX2 emulated, alternated CLI runs:
    # int4_weight_only 28.3 / 31.3 / 42.5 tok/s, int8_dynamic 20.8 / 21.6 / 23.2). Only where the native library
    # cannot build does int4 fall back to ATen's int4 GEMV, which is compute bound without AVX-512 (8.9 tok/s
    # against ATen int8's 11.1 when measured): still the fewest bytes of RAM, which is what opt=aggressive trades
    # for. int8_dynamic (the native integer GEMV) before ATen's int8 GEMV; it validates only where the native
    # kernel builds. The fidelity ceiling strikes int4 at moderate.
    quantised = ("int4_weight_only", "int8_dynamic", "int8_weight_only")
    return {
        # Measured on a 2-core AVX-512 VM, 1024-token prefill: torch's fused CPU SDPA 3.4x faster than chunked.
        "attention": ("native", "sdpa", "chunked", "eager"),   # native: decode step, bf16 prefill in C
        "rotary": ("native", "cached", "reference"),    # native: the project's C rotation where it builds
        "kernels": (*quantised, *exact),
        "memory": ("cpu", "ssd_stream"),      # what the RAM budget cannot hold is streamed from disk
        "kv_cache": ("int8", "static"),
    }


def gpu_chains(hw: HardwareProfile) -> Chains:
    """Per-slot chains for a machine whose GPU torch can use."""
    assert hw.gpu is not None
    ampere = hw.gpu.compute_capability >= (8, 0)
    return {
        "attention": (("sdpa_flash",) if ampere else ()) + ("sdpa_mem_efficient", "sdpa", "chunked", "eager"),
        "rotary": ("cached", "reference"),
        # Pascal (sm_6x) has no bf16 and runs fp16 maths at 1/64 rate: fp16 storage, fp32 compute.
        "kernels": ("torch_native", "int8_weight_only", "fp32_compute") if ampere
        else ("fp16_store", "int8_weight_only", "fp32_compute", "torch_native"),
        # Streaming every layer from pinned RAM beats partial residency only on a host link faster than the CPU's
        # RAM (cuda_offload_stream validates that from pcie_gb_s); otherwise its rejection says why.
        "memory": ("cuda_full", "cuda_offload_stream", "cuda_partial", "cpu", "ssd_stream"),
        "kv_cache": ("int8", "static"),
    }


def derive_chains(hw: HardwareProfile) -> Chains:
    """The chains for these facts: the GPU's where torch can use it, else this CPU's."""
    return gpu_chains(hw) if hw.cuda_usable else cpu_chains(hw)
