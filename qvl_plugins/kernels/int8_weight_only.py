"""Weight-only int8: per-output-channel symmetric int8 weights, activations stay in the compute dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.slots import Fidelity, Plugin, RunFacts
from qvl_pipeline.slots.checks import check_kernels
from qvl_pipeline.slots.kernels import KernelsBackend
from qvl_pipeline.slots.selftest import self_test_devices

# ATen's CPU int8 × bf16 GEMV kernel (torch ≥ 2.4): AVX2/AVX-512 vector code, scalar elsewhere. Its vector loops
# use aligned 16-element loads and do not check shapes: only in_features % 16 == 0 is safe.
_INT8PACK_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
PACK_ALIGN = 16
# On CPU the dequant path widens the int8 weight this many elements at a time (4 MB in fp32): widening it whole
# allocates and streams a full-size copy per call, measured ~8x slower at batch 1 (41 ms vs 4.6 ms, 2048x6144).
CPU_DEQUANT_BLOCK = 1 << 20
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] -> (int8 [out, in], fp32 scale [out]) with weight ≈ int8 · scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class QuantizableLinear(nn.Linear):
    """A plain nn.Linear ({weight, bias}, so checkpoints load) that prepare() will turn into Int8Linear."""


class Int8Linear(nn.Module):
    """y = (x · w_int8ᵀ) · scale + bias. Buffers weight_int8 [out, in], weight_scale [out] fp32; bias as loaded.

    Kernel, chosen when the weights are set or moved (never per call): on CPU with a SIMD int8 path and
    in_features % 16 == 0, up to `pack_max_rows` rows go through ATen's int8 GEMV (activations rounded to bf16,
    fp32 accumulation); everything else multiplies by the int8 weight cast to the activations' dtype, block by
    block of output rows on CPU, whole on a GPU.
    """

    def __init__(self, source: nn.Linear, *, pack_cpu: bool, pack_max_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = source.in_features, source.out_features
        q, scale = quantize_per_channel(source.weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.bias = source.bias
        self.pack_cpu = pack_cpu and _INT8PACK_MM is not None and self.in_features % PACK_ALIGN == 0
        self.pack_max_rows = pack_max_rows
        self._select_kernel()

    def _select_kernel(self) -> None:
        """Set the int8 GEMV's unit scales (the fp32 scale is applied after; None: no GEMV) and the number of
        output rows the dequant path widens at a time."""
        on_cpu = self.weight_int8.device.type == "cpu"
        use_pack = self.pack_cpu and on_cpu
        self._pack_ones: torch.Tensor | None = torch.ones(self.out_features, dtype=torch.bfloat16) if use_pack else None
        self._dequant_rows = max(1, CPU_DEQUANT_BLOCK // self.in_features) if on_cpu else self.out_features

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        super()._apply(fn, recurse)
        self._select_kernel()           # a move to another device picks that device's kernel
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x: [..., in] -> [..., out]
        rows = x.numel() // self.in_features
        if self._pack_ones is not None and rows <= self.pack_max_rows:
            a = x.reshape(rows, self.in_features).to(torch.bfloat16, copy=True)   # fresh, hence aligned
            y = _INT8PACK_MM(a, self.weight_int8, self._pack_ones).to(x.dtype).view(*x.shape[:-1], -1)
        else:
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for start in range(0, self.out_features, self._dequant_rows):
                block = self.weight_int8[start:start + self._dequant_rows]                 # [rows, in] int8
                y[..., start:start + block.shape[0]] = F.linear(x, block.to(x.dtype))
        y = y * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        kernel = "int8pack_mm" if self._pack_ones is not None else "dequant"
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, kernel={kernel}"


@dataclass(frozen=True)
class Int8Options:
    quantize_head: bool = False     # the output head through int8 too (tied heads keep the exact embedding)
    pack_max_rows: int = 32         # inputs up to this many rows use the int8 GEMV; larger ones the dequant GEMM
    compute_dtype: str = "float32"  # activations' dtype: float32 | bfloat16 | float16 | stored

    def __post_init__(self) -> None:
        if self.compute_dtype != "stored" and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype {self.compute_dtype!r} is not one of {[*COMPUTE_DTYPES, 'stored']}")


class Int8WeightOnlyKernels(KernelsBackend):
    fidelity = Fidelity.NEAR
    summary = ("int8 weights with per-channel scales, dequantised on the fly (ATen int8 GEMV on AVX2/AVX-512 CPUs "
               "for decode): a quarter of fp32's bytes per token, the main decode lever on bandwidth-bound machines")

    Options = Int8Options

    def __init__(self, facts: RunFacts, options: Int8Options | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self.quantize_head = self.options.quantize_head
        self.pack_max_rows = self.options.pack_max_rows
        dtype = self.options.compute_dtype
        self._compute = None if dtype == "stored" else COMPUTE_DTYPES[dtype]
        # ATen's int8 GEMV is vectorised for AVX2 and AVX-512 only; elsewhere its scalar loop loses to dequant.
        self.pack_cpu = self.hw.has_isa("avx2") or self.hw.has_isa("avx512f")

    def linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return QuantizableLinear(in_features, out_features, bias=bias)

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return stored if self._compute is None else self._compute

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap every QuantizableLinear for an Int8Linear under the same name (lm_head only if quantize_head)."""
        def quantized(module: nn.Module) -> Int8Linear:
            return Int8Linear(module, pack_cpu=self.pack_cpu, pack_max_rows=self.pack_max_rows)

        if isinstance(model, QuantizableLinear):
            return quantized(model)
        for name, module in list(model.named_modules()):
            if not isinstance(module, QuantizableLinear):
                continue
            parent_name, _, child = name.rpartition(".")
            if child == "lm_head" and not self.quantize_head:
                continue
            setattr(model.get_submodule(parent_name), child, quantized(module))
        return model

    def self_test(self, reference: Plugin) -> None:
        for device in self_test_devices(self.hw):      # both kernels where the GEMV is selected
            check_kernels(self, reference, device, rows=(1, self.pack_max_rows + 1))
