"""Weight-only int8: per-output-channel symmetric int8 weights, activations stay in the compute dtype.

The plugin is a thin wrapper: the layer is `Int8Linear` (int8_linear.py), quantisation is streamed
(quantize.py), and the model-wide swap with its disk cache is `quantize_model` (quantized_model.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.cache_root import default_cache_dir
from qvl_pipeline.hardware.chains import native_bf16
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots import Fidelity, Plugin, RunFacts
from qvl_pipeline.slots.checks import check_kernels
from qvl_pipeline.slots.kernels import ComputeDtype, KernelsBackend, check_compute_option, choose_compute_dtype
from qvl_pipeline.slots.selftest import self_test_devices
from qvl_plugins.kernels.int8_linear import Int8Linear
from qvl_plugins.kernels.native_gemv import Int8Decode, native_dtype_ok
from qvl_plugins.kernels.quantize import quantize_int8_rows
from qvl_plugins.kernels.quantized_model import CacheBinding, Int8Format, find_targets, quantize_model

# Rows up to which the int8 GEMV beats widening the weight and running the GEMM in the compute dtype.
# bf16 where bf16 matmul is native (AVX512-BF16/AMX; 2048x6144 layer, 2 threads, bf16 activations: GEMV ~315 GFLOP/s
# at any row count, widen + bf16 GEMM 474 at 64 rows, 713 at 256).
NATIVE_BF16_PACK_ROWS = 32
# fp32 against ATen's int8 GEMV (AVX2 emulated on an AVX-512 VM, 1 thread, CPU time, 2048x6144: 12.7 vs 15.0 ms at
# 32 rows, 36.0 vs 32.5 at 96, 88.0 vs 67.8 at 223, 307 vs 220 at 784; 1024x4096 alike).
FP32_PACK_ROWS = 64
# A 16-bit GEMM the CPU emulates (~50 GFLOP/s) never wins, nor does fp32 against the native integer kernel
# (int8_dynamic; same setup: 43.7 vs 67.8 ms at 223 rows, 156 vs 220 at 784): the GEMV takes all rows.
UNLIMITED_ROWS = 1 << 62
# With the native int8 prefill GEMM (AVX512-VNNI; 2048x6144 layer, 2 threads, bf16): GEMV 0.28 / 0.54 / 1.07 /
# 1.87 ms at 4 / 8 / 16 / 32 rows against the GEMM's 0.40 / 0.55 / 0.64 / 1.00.
INTEGER_GEMM_PACK_ROWS = 8


def default_pack_rows(hw: HardwareProfile, compute: torch.dtype, integer_decode: bool,
                      integer_gemm: bool = False) -> int:
    """pack_max_rows when the option is not set, for activations in `compute`, a decode GEMV that is the native
    integer kernel (`integer_decode`) or ATen's, and larger inputs through the native int8 GEMM (`integer_gemm`):
    see the constants above."""
    if integer_gemm:
        return INTEGER_GEMM_PACK_ROWS
    if compute == torch.bfloat16 and native_bf16(hw):
        return NATIVE_BF16_PACK_ROWS
    if compute == torch.float32 and not integer_decode:
        return FP32_PACK_ROWS
    return UNLIMITED_ROWS


__all__ = ["Int8Linear", "Int8Options", "Int8WeightOnlyKernels", "QuantizableLinear", "quantize_per_channel"]


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], fp32 scale [out]) with weight ≈ int8 · scale[:, None]."""
    return quantize_int8_rows(weight.detach())


class QuantizableLinear(nn.Linear):
    """A plain nn.Linear ({weight, bias}, so checkpoints load) that prepare() turns into a quantised layer. One that
    stays unquantised (the output head with quantize_head=false) keeps its stored weight and takes activations of
    any dtype: it computes in the weight's dtype and returns the activations' (never an fp32 copy of a large weight).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x: [..., in] -> [..., out] in x's dtype
        weight = self.weight
        if x.dtype == weight.dtype:
            return F.linear(x, weight, self.bias)
        return F.linear(x.to(weight.dtype), weight, self.bias).to(x.dtype)


def cache_binding(facts: RunFacts, enabled: bool, cache_dir: str) -> CacheBinding | None:
    """Where the run's checkpoint's quantised weights are cached (None: caching off, or no checkpoint folder)."""
    folder = facts.model.folder
    if not enabled or folder is None:
        return None
    try:
        return CacheBinding.for_checkpoint(folder, cache_dir or default_cache_dir())
    except Exception as exc:           # a checkpoint the loader accepted but the cache cannot identify: no cache
        warnings.warn(f"quantised-weight cache unavailable for {folder}: {exc}", stacklevel=2)
        return None


@dataclass(frozen=True)
class Int8Options:
    quantize_head: bool = True      # the output head through int8 too (a tied head gets its own int8 copy; the
                                    # embedding lookup keeps the exact table)
    pack_max_rows: int | None = None  # inputs up to this many rows use the int8 GEMV, larger ones widen the weight
                                      # and run the GEMM; None: 32 in native bf16, 64 in fp32 (ATen's GEMV), else
                                      # all rows (default_pack_rows)
    compute_dtype: str = "auto"     # activations' dtype: auto | stored | float32 | bfloat16 | float16; auto: the
                                    # stored dtype where the CPU (or GPU) computes it natively or where the integer
                                    # kernel takes every row (int8_dynamic on AVX2), else float32
    cache: bool = True              # keep the quantised weights on disk (<cache_dir>/quantized/) for fast restarts
    cache_dir: str = ""             # "" = $QVL_CACHE_DIR or ~/.cache/qvl_pipeline

    def __post_init__(self) -> None:
        check_compute_option(self.compute_dtype)


class Int8WeightOnlyKernels(KernelsBackend):
    fidelity = Fidelity.NEAR
    summary = ("int8 weights with per-channel scales, dequantised on the fly (ATen int8 GEMV on AVX2/AVX-512 CPUs "
               "for decode): a quarter of fp32's bytes per token, the main decode lever on bandwidth-bound machines")

    Options = Int8Options

    def __init__(self, facts: RunFacts, options: Int8Options | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self.quantize_head = self.options.quantize_head
        # int8_dynamic's integer kernel takes every row where bf16 is not native: then no GEMM runs in the compute
        # dtype (see choose_compute_dtype and default_pack_rows).
        decode = self.decode_gemv()
        integer_decode = decode is not None
        integer_gemm = integer_decode and decode.prefill_gemm
        self.integer_matmuls = integer_decode and (integer_gemm or not native_bf16(self.hw))
        compute = self.compute_dtype(getattr(torch, self.facts.model.stored_dtype))
        self.pack_max_rows = (default_pack_rows(self.hw, compute, integer_decode, integer_gemm)
                              if self.options.pack_max_rows is None else self.options.pack_max_rows)
        # ATen's int8 GEMV is vectorised for AVX2 and AVX-512 only; elsewhere its scalar loop loses to dequant.
        self.pack_cpu = self.hw.has_isa("avx2") or self.hw.has_isa("avx512f")

    def linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return QuantizableLinear(in_features, out_features, bias=bias)

    def decode_gemv(self) -> Int8Decode | None:
        """The native decode GEMV the layers use (None: ATen's int8 GEMV)."""
        return None

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.compute(stored).dtype

    def compute_reason(self, stored: torch.dtype) -> str:
        return self.compute(stored).reason

    def compute(self, stored: torch.dtype) -> ComputeDtype:
        # The integer kernel takes bf16 and fp32 activations; others (fp16) would widen the weights into their GEMM.
        return choose_compute_dtype(self.options.compute_dtype, stored, self.hw,
                                    integer_matmuls=self.integer_matmuls and native_dtype_ok(stored))

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap every QuantizableLinear for an Int8Linear under the same name, and give the output head (also a
        tied one) an int8 copy when quantize_head; through the disk cache when the run has a checkpoint folder."""
        fmt = Int8Format(pack_cpu=self.pack_cpu, pack_max_rows=self.pack_max_rows, decode=self.decode_gemv())
        targets = find_targets(model, lambda m: isinstance(m, QuantizableLinear), lambda name, m: fmt,
                               fmt if self.quantize_head else None)
        binding = cache_binding(self.facts, self.options.cache, self.options.cache_dir) if len(targets) > 1 else None
        return quantize_model(model, targets, binding)

    def self_test(self, reference: Plugin) -> None:
        switch = (self.pack_max_rows + 1,) if self.pack_max_rows < UNLIMITED_ROWS else ()
        rows = tuple(sorted({1, 5, 40, *switch}))                            # each kernel it selects
        for device in self_test_devices(self.hw):
            check_kernels(self, reference, device, rows=rows)
