"""int8 weights and int8 activations: the project's native integer GEMV and GEMM (llama.cpp Q8_0 style).

Same stored weights as int8_weight_only (per-output-channel symmetric int8, the same quantised-weight cache).
Inputs of up to pack_max_rows rows (decode) are quantised to int8 per block of 64 columns and multiplied with
integer dot products (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw) by native/qvl_gemv.c, built at first use; the
integer kernel reads the int8 weights at the memory bound where ATen's int8 GEMV is compute bound (converting every
weight to fp32). Larger inputs (prefill, the vision tower) run the same int8 x int8 product as a native GEMM where
the CPU has AVX512-VNNI (prefill_kernel=auto; ~1.6x a bf16 GEMM on the 2B shapes), else multiply the widened
weights exactly, as int8_weight_only does. The decoder's RMSNorm at decode and the vision MLP's tanh GELU run native
too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_pipeline.slots.kernels import DecodeStep
from qvl_plugins.kernels.int8_linear import decode_together
from qvl_plugins.kernels.int8_weight_only import Int8Options, Int8WeightOnlyKernels
from qvl_plugins.kernels.native_activation import native_activation
from qvl_plugins.kernels.native_decode import native_decode_step
from qvl_plugins.kernels.native_gemv import Int8Decode, check_prefill_kernel, has_int8_gemm, native_for
from qvl_plugins.kernels.native_norm import NativeRMSNorm

VECTOR_ISAS = ("avx512_vnni", "avx512", "avx2")     # the native builds with integer dot products worth using


@dataclass(frozen=True)
class Int8DynamicOptions(Int8Options):
    prefill_kernel: str = "auto"    # inputs past pack_max_rows rows: auto = the native int8 x int8 GEMM where the
                                    # CPU has AVX512-VNNI (int8 activations as in decode), else the widened weights;
                                    # widen = always the exact widened weights in the activations' dtype

    def __post_init__(self) -> None:
        super().__post_init__()
        check_prefill_kernel(self.prefill_kernel)


class Int8DynamicKernels(Int8WeightOnlyKernels):
    fidelity = Fidelity.NEAR
    summary = ("int8 weights; decode multiplies int8 activations (per block of 64) with integer dot products in "
               "the project's native kernel (AVX512-VNNI / AVX2) over weights stored in tiles of 4 rows, prefill "
               "the same product as a native GEMM on AVX512-VNNI (elsewhere the widened weights), decode RMSNorm and "
               "the vision MLP's tanh GELU in one native call each: the same bytes per token as int8_weight_only at "
               "the memory bound")

    Options = Int8DynamicOptions

    @classmethod
    def validate(cls, facts: RunFacts, options: Int8DynamicOptions) -> list[str]:
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

    def activation(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return native_activation(native_for(self.facts, self.options.cache_dir), name, super().activation(name))

    def project(self, x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
        together = decode_together(layers, x)
        return together if together is not None else super().project(x, layers)

    def decode_step(self, layers: Sequence[nn.Module], dtype: torch.dtype) -> tuple[DecodeStep | None, str]:
        return native_decode_step(layers, dtype)

    def decode_gemv(self) -> Int8Decode | None:
        build = native_for(self.facts, self.options.cache_dir)
        if not build.available:
            return None
        return Int8Decode(build, "int8", prefill_gemm=self.options.prefill_kernel == "auto" and has_int8_gemm(build))
