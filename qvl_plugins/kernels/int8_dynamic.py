"""int8 weights and, for decode, int8 activations: the project's native integer GEMV (llama.cpp Q8_0 style).

Same stored weights as int8_weight_only (per-output-channel symmetric int8, the same quantised-weight cache).
Inputs of up to pack_max_rows rows (decode) are quantised to int8 per block of 64 columns and multiplied with
integer dot products (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw) by native/qvl_gemv.c, built at first use;
larger inputs (prefill) multiply the widened weights exactly, as int8_weight_only does. The integer kernel reads
the int8 weights at the memory bound where ATen's int8 GEMV is compute bound (converting every weight to fp32).
"""

from __future__ import annotations

from torch import nn

from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_plugins.kernels.int8_weight_only import Int8Options, Int8WeightOnlyKernels
from qvl_plugins.kernels.native_gemv import Int8Decode, native_for
from qvl_plugins.kernels.native_norm import NativeRMSNorm

VECTOR_ISAS = ("avx512_vnni", "avx512", "avx2")     # the native builds with integer dot products worth using


class Int8DynamicKernels(Int8WeightOnlyKernels):
    fidelity = Fidelity.NEAR
    summary = ("int8 weights; decode multiplies int8 activations (per block of 64) with integer dot products in "
               "the project's native kernel (AVX512-VNNI / AVX2) over weights stored in tiles of 4 rows, prefill the "
               "widened weights exactly, decode RMSNorm in one native call: the same bytes per token as "
               "int8_weight_only at the memory bound instead of compute bound")

    Options = Int8Options

    @classmethod
    def validate(cls, facts: RunFacts, options: Int8Options) -> list[str]:
        reasons = super().validate(facts, options)
        if reasons:
            return reasons
        build = native_for(facts, options.cache_dir)
        if not build.available:
            return [f"native int8 kernel unavailable: {build.reason}"]
        if build.isa not in VECTOR_ISAS:
            return [f"the CPU has no AVX2 or AVX-512 (native build would be {build.isa})"]
        return []

    def norm(self, size: int, eps: float) -> nn.Module:
        build = native_for(self.facts, self.options.cache_dir)
        return NativeRMSNorm(size, eps, build) if build.available else super().norm(size, eps)

    def decode_gemv(self) -> Int8Decode | None:
        build = native_for(self.facts, self.options.cache_dir)
        return Int8Decode(build, "int8") if build.available else None
