"""Int8Linear: a linear layer with per-output-channel int8 weights; activations stay in their own dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qvl_plugins.kernels.native_gemv import ROWS, TILE_ROWS, TILED, Int8Decode, as_rows, native_dtype_ok, untile
from qvl_plugins.kernels.quantize import quantize_int8_rows
from qvl_plugins.kernels.scratch import recorded, rows_per_block, scratch

# ATen's CPU int8 × bf16 GEMV (torch ≥ 2.4): vector code for AVX2/AVX-512 and bf16 activations only (fp32 and fp16
# run a scalar loop, measured 30x slower). Its loops use aligned loads and do not check shapes: in_features % 16 == 0,
# the weight 16-byte aligned and the activations 32-byte aligned, or it reads out of bounds.
INT8PACK_MM = getattr(torch.ops.aten, "_weight_int8pack_mm", None)
PACK_ALIGN = 16
WEIGHT_ALIGN = 64
ACT_ALIGN = 32


def aligned(t: torch.Tensor, alignment: int = WEIGHT_ALIGN) -> torch.Tensor:
    """`t` if contiguous and its data starts on an `alignment`-byte boundary, else an aligned contiguous copy
    (torch's CPU allocator aligns fresh tensors to 64 bytes)."""
    if t.is_contiguous() and t.data_ptr() % alignment == 0:
        return t
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)


def frozen(t: torch.Tensor) -> nn.Parameter:
    """`t` as a parameter that takes no gradient (itself when it already is one)."""
    return t.requires_grad_(False) if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


class Int8Linear(nn.Module):
    """y = x · (q · scale)ᵀ + bias. Frozen parameters weight_int8 [out, in] int8 and weight_scale [out] fp32 (kept
    as parameters so code that asks a layer's device from its parameters works); bias as given. `layout` ROWS:
    weight_int8 is row-major; TILED (native_gemv.py, only with a `decode` that takes it): each group of 4 rows is
    stored as [in / 64, 4, 64] for the native decode GEMV's one sequential stream, and widened back to rows for
    every other path.

    Kernel, chosen when the weights are set or moved (never per call): on CPU, inputs of up to `pack_max_rows`
    rows go through the native decode GEMV when one is given and takes the shape (`decode`, native_gemv.py), else,
    with `pack_cpu` and in_features % 16 == 0, through ATen's int8 GEMV (activations and scales rounded to bf16,
    fp32 accumulation, bf16 result). Larger inputs (prefill, the vision tower) of a TILED weight whose `decode` has
    `prefill_gemm` run the same int8 × int8 product as a native GEMM; all others multiply by the int8 weight
    widened exactly to the activations' dtype with one ATen GEMM: on CPU into a reused per-thread buffer, the whole
    layer unless it is huge (scratch.py), on a GPU into a fresh tensor.
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, *,
                 pack_cpu: bool, pack_max_rows: int, decode: Int8Decode | None = None, layout: str = ROWS) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.weight_int8 = frozen(aligned(weight_int8))                 # [out, in] int8 in `layout`
        self.weight_scale = frozen(weight_scale)                        # [out] fp32
        self.bias = None if bias is None else frozen(bias)              # [out]
        self.pack_cpu = pack_cpu and INT8PACK_MM is not None and self.in_features % PACK_ALIGN == 0
        self.pack_max_rows = pack_max_rows
        self.decode = decode if decode is not None and decode.usable(self.in_features) else None
        if layout == TILED and (self.decode is None or self.decode.layout(*weight_int8.shape) != TILED):
            raise ValueError(f"a tiled int8 weight {tuple(weight_int8.shape)} needs a native decode GEMV that takes it")
        self.layout = layout
        self._select_kernel()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, pack_cpu: bool, pack_max_rows: int,
                 release_source: bool = False, decode: Int8Decode | None = None) -> Int8Linear:
        """From a float weight [out, in], quantised a block of rows at a time (see quantize_int8_rows)."""
        q, scale = quantize_int8_rows(weight.detach(), release_source=release_source)
        layout = decode.layout(*q.shape) if decode is not None else ROWS
        if layout == TILED:
            decode.tile_(q)
        return cls(q, scale, bias, pack_cpu=pack_cpu, pack_max_rows=pack_max_rows, decode=decode, layout=layout)

    def _select_kernel(self) -> None:
        """The decode GEMV on this device (native, ATen with its bf16 scales, or none) and the dequant path's rows
        per block."""
        on_cpu = self.weight_int8.device.type == "cpu"
        self._native = self.decode if on_cpu else None
        self._gemm = self._native is not None and self._native.prefill_gemm and self.layout == TILED
        use_pack = self.pack_cpu and on_cpu and self._native is None and self.layout == ROWS
        self._pack_scale: torch.Tensor | None = self.weight_scale.to(torch.bfloat16) if use_pack else None
        multiple = TILE_ROWS if self.layout == TILED else 1
        self._dequant_rows = (rows_per_block(self.out_features, self.in_features, multiple) if on_cpu
                              else self.out_features)
        self._widen_into_scratch = on_cpu

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Linear:
        super()._apply(fn, recurse)
        if self.layout == TILED and self.weight_int8.device.type != "cpu":
            self.weight_int8.data = untile(self.weight_int8.data).contiguous()   # only the CPU GEMV reads tiles
            self.layout = ROWS
        self._select_kernel()           # a move to another device picks that device's kernel
        return self

    @property
    def joins_native_call(self) -> bool:
        """Whether this layer can share one native call with others (decode_together, the fused decode step): it
        runs the native kernel over TILED weights and has no bias (those calls add none)."""
        return self._native is not None and self.layout == TILED and self.bias is None

    @property
    def kernel(self) -> str:
        if self._native is not None:
            return self._native.name + ("+gemm" if self._gemm else "")
        return "int8pack_mm" if self._pack_scale is not None else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x: [..., in] -> [..., out]
        rows = x.numel() // self.in_features
        if self._native is not None and rows <= self.pack_max_rows and native_dtype_ok(x.dtype):
            a = as_rows(x, self.in_features)
            y = self._native(a, self.weight_int8, self.weight_scale, self.layout).view(*x.shape[:-1], -1)
        elif self._gemm and native_dtype_ok(x.dtype) and not recorded(x):
            a = as_rows(x, self.in_features)
            y = self._native.many(a, [self.weight_int8], [self.weight_scale], gemm=True)[0].view(*x.shape[:-1], -1)
        elif self._pack_scale is not None and rows <= self.pack_max_rows:
            a = x.reshape(rows, self.in_features)
            if a.dtype != torch.bfloat16 or a.data_ptr() % ACT_ALIGN or not a.is_contiguous():
                a = a.to(torch.bfloat16, copy=True)                                   # fresh, hence aligned
            y = INT8PACK_MM(a, self.weight_int8, self._pack_scale).view(*x.shape[:-1], -1)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:
            y = self._widened_matmul(x)
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))          # y: this call's own output

    def _widen(self, start: int, rows: int, x: torch.Tensor) -> torch.Tensor:
        """Weight rows [start, start + rows) -> [rows, in] row-major in x's dtype: on CPU in the reused scratch buffer
        (see scratch.py), elsewhere (a GPU's caching allocator reuses it; a persistent buffer would cost scarce VRAM)
        or under autograd a fresh tensor."""
        block = self.weight_int8[start:start + rows]                                   # [rows, in] int8, `layout`
        if not self._widen_into_scratch or recorded(x):
            return (untile(block) if self.layout == TILED else block).to(x.dtype)
        out = scratch(tuple(block.shape), x.dtype, block.device)
        if self.layout == TILED:
            if self.decode is not None and native_dtype_ok(x.dtype):
                return self.decode.widen_into(self.weight_int8, start, out)
            return out.copy_(untile(block))
        return out.copy_(block)

    def _widened_matmul(self, x: torch.Tensor) -> torch.Tensor:   # x: [..., in] -> [..., out], no bias
        """The prefill path: x · qᵀ with q widened exactly to x's dtype (one native GEMM per block of
        `_dequant_rows` output rows: the whole layer unless it is huge), then the per-channel scales."""
        step = self._dequant_rows
        if step >= self.out_features:
            y = F.linear(x, self._widen(0, self.out_features, x))
        else:
            y = x.new_empty(*x.shape[:-1], self.out_features)
            for start in range(0, self.out_features, step):
                rows = min(step, self.out_features - start)
                y[..., start:start + rows] = F.linear(x, self._widen(start, rows, x))
        return y.mul_(self.weight_scale.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, kernel={self.kernel}, "
                f"layout={self.layout}")


def decode_together(layers: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """x [..., in] through several Int8Linear layers of that same input in one native call (q/k/v, gate/up: one
    activation quantisation and one parallel range instead of one per layer; the decode GEMV, or for larger inputs
    the prefill GEMM where the layers have it), or None where that does not apply (other layer types, a bias, rows
    layout, another dtype or device, a prefill-sized input without the GEMM)."""
    first = layers[0]
    if not isinstance(first, Int8Linear) or first._native is None or not native_dtype_ok(x.dtype):
        return None
    rows = x.numel() // first.in_features
    gemm = rows > first.pack_max_rows
    if gemm and (not first._gemm or recorded(x)):
        return None
    for layer in layers:
        if not (isinstance(layer, Int8Linear) and layer.joins_native_call and layer._native == first._native
                and layer.in_features == first.in_features and layer.pack_max_rows == first.pack_max_rows):
            return None
    a = as_rows(x, first.in_features)
    ys = first._native.many(a, [layer.weight_int8 for layer in layers], [layer.weight_scale for layer in layers],
                            gemm=gemm)
    return tuple(y.view(*x.shape[:-1], -1) for y in ys)
