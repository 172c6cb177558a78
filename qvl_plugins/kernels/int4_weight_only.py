"""Int4 weights: group-wise asymmetric 4-bit weights; decode through the project's native int4 x int8 GEMV (or ATen's
CPU int4 GEMM, whose activations stay in their dtype), prefill through the native int4 x int8 GEMM where the CPU has
AVX512-VNNI, else the widened weights.

The plugin is a thin wrapper: the layer is `Int4Linear` (int4_linear.py), quantisation is streamed
(quantize.py), and the model-wide swap with its disk cache is `quantize_model` (quantized_model.py). The output
head (also a tied one) is int4 as well by default (`head_bits=4`; 8 keeps an int8 copy, ~10 % more bytes per token
for a slightly smaller error: see weight_format.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.hardware.chains import native_bf16
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots import Fidelity, Plugin, RunFacts, SelfTestError
from qvl_pipeline.slots.checks import check_activations, prepared_pair
from qvl_pipeline.slots.kernels import DecodeStep, KernelsBackend, check_compute_option, choose_compute_dtype
from qvl_pipeline.slots.selftest import check_close, failures_as_selftest_error, relative_error, self_test_devices
from qvl_pipeline.weight_format import INT4_GROUP, INT4_HEAD_BITS, INT4_VISION_BITS
from qvl_plugins.kernels.int4_linear import ATEN_GROUP_SIZES, INT4PACK_MM, UNLIMITED_ROWS, Int4Linear, decode_together
from qvl_plugins.kernels.int8_weight_only import QuantizableLinear, cache_binding, default_pack_rows
from qvl_plugins.kernels.native_activation import native_activation
from qvl_plugins.kernels.native_decode import native_decode_step
from qvl_plugins.kernels.native_gemv import (
    INT4_DECODE_ROWS,
    Int4Decode,
    Int8Decode,
    check_prefill_kernel,
    has_int4_gemm,
    has_int8_gemm,
    native_for,
)
from qvl_plugins.kernels.native_norm import NativeRMSNorm
from qvl_plugins.kernels.quantized_model import (
    Int4Format,
    Int8Format,
    LinearFormat,
    find_targets,
    in_vision_tower,
    quantize_model,
)

# 4-bit weights cannot meet APPROXIMATE's 5e-2 per layer: on Gaussian weights the relative error of a 16-level
# quantiser per group of 32 is ~0.078 (measured; 64: 0.089, 128: 0.099). The self-test checks the quantisation
# against this bound and the kernel against the dequantised weights at NEAR.
INT4_WEIGHT_ERROR = 0.12
SELF_TEST_SHAPE = (256, 128)       # in_features a multiple of every group size, out_features whole tiles of every
                                   # ATen layout (so the prefill path runs too)
# Rows up to which ATen's int4 GEMM beats dequantising the weight and running the GEMM in the compute dtype: bf16
# where bf16 matmul is native (AVX512-BF16/AMX; 1 thread: 2048x6144 layer 16.5 vs 16.6 ms at 96 rows, 22.2 vs 18.9 at
# 128, 38.8 vs 23.8 at 223); fp32 (AVX2 emulated on an AVX-512 VM, 1 thread, CPU time, 2048x6144: 36.5 vs 38.1 ms at
# 96 rows, 85.2 vs 75.4 at 223, 295 vs 228 at 784). A 16-bit GEMM the CPU emulates never wins: ATen's kernel takes
# every row.
NATIVE_BF16_INT4_PACK_ROWS = 96
FP32_INT4_PACK_ROWS = 128


def default_int4_pack_rows(hw: HardwareProfile, compute: torch.dtype) -> int:
    """int4_pack_max_rows when the option is not set, for activations in `compute`: see the constants above."""
    if compute == torch.bfloat16 and native_bf16(hw):
        return NATIVE_BF16_INT4_PACK_ROWS
    return FP32_INT4_PACK_ROWS if compute == torch.float32 else UNLIMITED_ROWS


@dataclass(frozen=True)
class Int4Options:
    group_size: Literal[32, 64, 128, 256] = INT4_GROUP  # inputs sharing one scale and zero (smaller: more accurate,
                                                 # 0.5 bit/weight more per halving)
    head_bits: Literal[4, 8] = INT4_HEAD_BITS    # the output head (also a tied one) in int4 (default) or int8: see
                                                 # qvl_pipeline/weight_format.py for the measured trade
    vision_bits: Literal[4, 8] = INT4_VISION_BITS  # the vision tower's linears in int8 (default: its GEMM is ~2x
                                                 # the int4 one, and it runs once per image) or int4
    pack_max_rows: int | None = None             # head_bits=8: rows up to which the head's int8 GEMV is used
                                                 # (None: see int8)
    int4_pack_max_rows: int | None = None        # decode_kernel=aten: rows up to which ATen's int4 GEMM is used,
                                                 # larger inputs (prefill) dequantise and run the native GEMM;
                                                 # None: 96 in native bf16, 128 in fp32, else all rows
    compute_dtype: str = "auto"                  # activations' dtype: auto | stored | float32 | bfloat16 | float16
                                                 # (auto: as int8_weight_only's)
    decode_kernel: Literal["native", "aten"] = "native"  # native: the project's int4 x int8 GEMV over weights
                                                 # in tiles of 16 rows (activations quantised per 32 columns; 2B
                                                 # layers, 0.88 GB: 18-22 ms/token, 40-48 GB/s, 2 threads, AVX-512
                                                 # VM) where a C compiler builds it; aten: ATen's int4 GEMM (24-32
                                                 # ms, 28-36 GB/s there; activations stay bf16)
    prefill_kernel: Literal["auto", "widen"] = "auto"  # inputs past the decode GEMV's rows (prefill, vision)
                                                 # with decode_kernel=native: auto = the native int4 x int8 GEMM
                                                 # over the tiles where the CPU has AVX512-VNNI (activations
                                                 # quantised per 32 columns as in decode; ~620 vs ~350 GFLOP/s for
                                                 # widen + bf16 GEMM at the 2B shapes), the decode GEMV for every
                                                 # row where bf16 is not native either (AVX2), else the widened
                                                 # weights; widen = always the widened weights in the activations'
                                                 # dtype
    cache: bool = True                           # keep the quantised weights on disk for fast restarts
    cache_dir: str = ""                          # "" = $QVL_CACHE_DIR or ~/.cache/qvl_pipeline

    def __post_init__(self) -> None:
        if self.group_size not in ATEN_GROUP_SIZES:
            raise ValueError(f"group_size {self.group_size!r} is not one of {list(ATEN_GROUP_SIZES)}")
        if self.head_bits not in (4, 8):
            raise ValueError(f"head_bits {self.head_bits!r} is not 4 or 8")
        if self.vision_bits not in (4, 8):
            raise ValueError(f"vision_bits {self.vision_bits!r} is not 4 or 8")
        check_prefill_kernel(self.prefill_kernel)
        check_compute_option(self.compute_dtype)


class Int4WeightOnlyKernels(KernelsBackend):
    fidelity = Fidelity.APPROXIMATE
    summary = ("int4 weights per group of inputs with a scale and zero each (least-squares fitted), head included, "
               "vision tower int8: about 1/6 of fp32's bytes per token; decode through the project's native int4 x "
               "int8 GEMV (or ATen's int4 GEMM), prefill through its int4 x int8 GEMM on AVX512-VNNI, else the "
               "widened weights; the vision MLP's tanh GELU native")

    Options = Int4Options

    def __init__(self, facts: RunFacts, options: Int4Options | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        vector = self.hw.has_isa("avx2") or self.hw.has_isa("avx512f")
        build = native_for(facts, self.options.cache_dir) if vector else None
        built = build is not None and build.available
        native = built and self.options.decode_kernel == "native"
        # ATen's int4 GEMM is vectorised for AVX2 and AVX-512 only; elsewhere the dequant path is used. With the
        # native decode GEMV the weights are stored in its tiles (prefill widens them natively).
        self.use_aten = not native and INT4PACK_MM is not None and vector
        self.decode_kernel = "native" if native else ("aten" if self.use_aten else "dequant")
        compute = self.compute_dtype(getattr(torch, facts.model.stored_dtype))
        int4_rows = (default_int4_pack_rows(self.hw, compute) if self.options.int4_pack_max_rows is None
                     else self.options.int4_pack_max_rows)
        gemm = native and has_int4_gemm(build)
        # Without the int4 GEMM (AVX512-VNNI only) and without native bf16, widened weights would multiply in fp32:
        # there the decode GEMV taking every row is faster (AVX2 emulated, 2B, 2 threads: a 220-token prefill
        # 4.6 -> 2.7 s; 8B, 82 tokens: 10 s with the widened weights, against 5.2 s for int8_dynamic's GEMV).
        every_row = native and not gemm and not native_bf16(self.hw) and self.options.prefill_kernel == "auto"
        decode = (Int4Decode(build, prefill_gemm=self.options.prefill_kernel == "auto" and gemm,
                             max_rows=UNLIMITED_ROWS if every_row else INT4_DECODE_ROWS) if native else None)
        self._int4 = Int4Format(group=self.options.group_size, use_aten=self.use_aten, decode=decode,
                                pack_max_rows=int4_rows)
        # Rows the self-test runs: decode, a few, and past each row limit a kernel switches at.
        limits = [decode.max_rows] if decode is not None else ([int4_rows] if self.use_aten else [])
        self._test_rows = (1, 5, 40, *(n + 1 for n in limits if n < UNLIMITED_ROWS and n + 1 not in (5, 40)))
        int8_gemm = built and self.options.prefill_kernel == "auto" and has_int8_gemm(build)
        pack_rows = (default_pack_rows(self.hw, compute, built, int8_gemm) if self.options.pack_max_rows is None
                     else self.options.pack_max_rows)
        # The int8 head decodes through the native int8 x int8 GEMV wherever it builds (52.7 vs 62.5 ms/token
        # for int8 layers + head against ATen's int8 GEMV, same VM).
        self._int8 = Int8Format(pack_cpu=vector, pack_max_rows=pack_rows,
                                decode=Int8Decode(build, "int8", prefill_gemm=int8_gemm) if built else None)
        self._native = build if built else None             # decode-sized RMSNorms in one native call too

    def linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return QuantizableLinear(in_features, out_features, bias=bias)

    def project(self, x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
        together = decode_together(layers, x)
        return together if together is not None else super().project(x, layers)

    def decode_step(self, layers: Sequence[nn.Module], dtype: torch.dtype) -> tuple[DecodeStep | None, str]:
        return native_decode_step(layers, dtype)

    def norm(self, size: int, eps: float) -> nn.Module:
        return NativeRMSNorm(size, eps, self._native) if self._native is not None else super().norm(size, eps)

    def activation(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        fallback = super().activation(name)
        return native_activation(self._native, name, fallback) if self._native is not None else fallback

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return choose_compute_dtype(self.options.compute_dtype, stored, self.hw).dtype

    def compute_reason(self, stored: torch.dtype) -> str:
        return choose_compute_dtype(self.options.compute_dtype, stored, self.hw).reason

    def _format_for(self, name: str, module: nn.Module) -> LinearFormat:
        # The vision tower with vision_bits=8, and a layer whose inputs do not split into whole groups, are int8.
        if self.options.vision_bits == 8 and in_vision_tower(name):
            return self._int8
        return self._int4 if module.in_features % self.options.group_size == 0 else self._int8

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap every QuantizableLinear for an Int4Linear under the same name (int8 in the vision tower with
        vision_bits=8 and where in_features is not a multiple of the group size), and give the output head (also a
        tied one) a head_bits copy; through the disk cache when the run has a checkpoint folder."""
        head = self._int8 if self.options.head_bits == 8 else self._int4
        targets = find_targets(model, lambda m: isinstance(m, QuantizableLinear), self._format_for, head)
        binding = cache_binding(self.facts, self.options.cache, self.options.cache_dir) if len(targets) > 1 else None
        return quantize_model(model, targets, binding)

    def self_test(self, reference: Plugin) -> None:
        """The kernel against the reference on the dequantised weights (NEAR: only activation rounding may
        differ), and the quantisation against the reference's exact weights (INT4_WEIGHT_ERROR)."""
        in_f, out_f = SELF_TEST_SHAPE
        for device in self_test_devices(self.hw):
            gen = torch.Generator().manual_seed(0)
            with failures_as_selftest_error(f"{type(self).__name__} self-test on {device}"):
                want_linear, mine = prepared_pair(self, reference, in_f, out_f, gen, device)
                if not isinstance(mine, Int4Linear):
                    raise SelfTestError(f"prepare made a {type(mine).__name__}, not an Int4Linear")
                weight = mine.dequantize().cpu()                                         # [out, in] fp32
                err = relative_error(weight, want_linear.weight)
                if not err <= INT4_WEIGHT_ERROR:
                    raise SelfTestError(f"int4 weights: relative error {err:.3g} vs the reference's exceeds "
                                        f"{INT4_WEIGHT_ERROR} (4-bit quantisation of Gaussian weights: ~0.08)")
                for rows in self._test_rows:
                    x = torch.randn(rows, in_f, generator=gen)
                    exact = F.linear(x, weight, want_linear.bias)
                    for dtype in dict.fromkeys((self.compute_dtype(torch.float32), torch.bfloat16)):
                        got = mine(x.to(device, dtype))
                        check_close(f"linear on {device}, {rows} row(s) in {dtype}, vs its dequantised weights",
                                    got.float(), exact, Fidelity.NEAR)
                for dtype in dict.fromkeys((self.compute_dtype(torch.float32), torch.bfloat16)):
                    check_activations(self, reference, device, dtype, Fidelity.NEAR)
