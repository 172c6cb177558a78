"""Int4Linear: a linear layer with group-wise asymmetric 4-bit weights; activations stay in their own dtype."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qvl_plugins.kernels.int8_linear import frozen
from qvl_plugins.kernels.native_gemv import (
    INT4_TILED,
    Q4_TILE_ROWS,
    Int4Decode,
    as_rows,
    int4_tileable,
    native_dtype_ok,
    tile_int4_codes,
    tile_scale_zero,
    untile_int4_codes,
    untile_scale_zero,
)
from qvl_plugins.kernels.quantize import (
    block_rows,
    dequantize_int4,
    dequantize_int4_plain,
    dequantize_int4_tiles,
    pack_nibbles,
    quantize_int4_groups,
    unpack_nibbles,
)
from qvl_plugins.kernels.scratch import recorded, rows_per_block, scratch

# ATen's CPU int4 × bf16 GEMM (torch ≥ 2.6): vector code for AVX2/AVX-512 and bf16 activations (fp32 runs a
# scalar loop, measured ~40x slower). Its weight layout is tiled over output rows and differs per CPU capability.
INT4PACK_MM = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
CONVERT_INT4PACK = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
ATEN_GROUP_SIZES = (32, 64, 128, 256)
ATEN_OUT_MULTIPLE = 16             # the packer's check: out_features divisible by 16
ATEN_ROW_TILE = 64                 # a multiple of every capability's row tile (64 AVX-512, 32 AVX2)
PLAIN = "plain"                    # two codes per byte, even input columns in the low nibble
CPU_DEQUANT_BLOCK = 1 << 20        # weight elements the code conversion to the plain layout handles at a time
UNLIMITED_ROWS = 1 << 62           # pack_max_rows that keeps every input on ATen's kernel


def aten_layout() -> str:
    """Name of the weight layout ATen's CPU int4 kernel uses in this process (it depends on the CPU capability)."""
    return f"aten_cpu_{torch.backends.cpu.get_cpu_capability().lower()}"


def aten_int4_usable(in_features: int, out_features: int, group: int) -> bool:
    """Whether ATen's CPU int4 kernel exists in this torch and takes this shape and group size."""
    return (INT4PACK_MM is not None and CONVERT_INT4PACK is not None and group in ATEN_GROUP_SIZES
            and in_features % group == 0 and out_features % ATEN_OUT_MULTIPLE == 0)


def _aten_pack(codes: torch.Tensor) -> torch.Tensor:
    return CONVERT_INT4PACK(codes.to(torch.int32).contiguous(), 2)              # [rows, in / 2] uint8


@cache
def _aten_permutation(rows: int, in_features: int, layout: str) -> torch.Tensor:
    """For a block of `rows` rows: index into the row-major codes [rows, in] of each nibble of the packed block
    (nibbles read low first). Found by packing the bits of the indices through ATen's own packer."""
    del layout                                               # part of the cache key: the packing depends on it
    index = torch.arange(rows * in_features, dtype=torch.int64)
    perm = torch.zeros_like(index)
    for shift in range(0, max(1, int(index[-1]).bit_length()), 4):
        codes = ((index >> shift) & 0xF).view(rows, in_features)
        perm |= unpack_nibbles(_aten_pack(codes)).reshape(-1).to(torch.int64) << shift
    return perm


@dataclass(frozen=True)
class TileFormat:
    """An ATen CPU int4 layout that stores tiles of `rows` output rows as [out / rows, in, rows / 2] bytes, each
    byte two codes of one input column: rows d and d + rows / 2 of the tile (`halves`), or rows 2d and 2d + 1."""

    rows: int
    halves: bool

    def permutation(self, out_features: int, in_features: int) -> torch.Tensor:
        """Index into the row-major codes [out, in] of each nibble of the packed weight (low nibble first)."""
        tile = torch.arange(out_features // self.rows)[:, None, None, None]
        col = torch.arange(in_features)[None, :, None, None]
        d = torch.arange(self.rows // 2)[None, None, :, None]
        h = torch.arange(2)[None, None, None, :]
        row = tile * self.rows + (h * (self.rows // 2) + d if self.halves else 2 * d + h)
        return (row * in_features + col).reshape(-1)


@cache
def tile_format(layout: str) -> TileFormat | None:
    """How this process's ATen layout tiles the codes (found by packing index bits through ATen's own packer), or
    None when it is none of the tilings known here (then every input stays on ATen's kernel)."""
    out_f, in_f = 2 * ATEN_ROW_TILE, 8
    perm = _aten_permutation(out_f, in_f, layout)
    for fmt in (TileFormat(r, halves) for r in (64, 32, 16) for halves in (True, False)):
        if torch.equal(fmt.permutation(out_f, in_f), perm):
            return fmt
    return None


def aten_to_plain(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """ATen CPU-packed int4 weight [out, in / 2] (this process's layout) -> the plain layout [out, in / 2]."""
    out_features = packed.shape[0]
    plain = torch.empty_like(packed)
    step = block_rows(in_features, ATEN_ROW_TILE, CPU_DEQUANT_BLOCK)
    for s in range(0, out_features, step):
        for t in range(s, min(s + step, out_features), ATEN_ROW_TILE):
            r = min(ATEN_ROW_TILE, out_features - t)
            nibbles = unpack_nibbles(packed[t:t + r].cpu()).reshape(-1)
            codes = torch.empty_like(nibbles)
            codes[_aten_permutation(r, in_features, aten_layout())] = nibbles
            plain[t:t + r] = pack_nibbles(codes.view(r, in_features)).to(packed.device)
    return plain


class Int4Linear(nn.Module):
    """y = x · Wᵀ + bias with W[o, i] = (q[o, i] − 8) · scale[g, o] + zero[g, o], g = i // group.

    Frozen parameters weight_int4 [out, in / 2] uint8 (codes, in `layout`) and weight_scale_zero
    [in / group, out, 2] bf16 ([out / 16, in / group, 16, 2] in INT4_TILED); bias as given. Layouts: PLAIN (two
    codes per byte), ATen's CPU layout, or INT4_TILED (native_gemv.py; only with a native `decode` GEMV, on CPU).
    Kernel, chosen when the weights are set or moved (never per call):
    on CPU in INT4_TILED, the native int4 × int8 GEMV for inputs of up to decode.max_rows rows, larger ones (prefill)
    through the weight dequantised natively into a reused buffer and the native GEMM;
    on CPU with the ATen layout, ATen's int4 GEMM (activations rounded to bf16, fp32 accumulation, bf16 result) for
    inputs of up to `pack_max_rows` rows, larger ones (prefill) through the dequantised tiles (see _tiled_matmul);
    elsewhere the weight is dequantised to the activations' dtype (rounded once) and multiplied by the native GEMM:
    on CPU the whole layer into a reused buffer (see scratch.py), on a GPU a block of output rows at a time.
    """

    def __init__(self, weight_int4: torch.Tensor, weight_scale_zero: torch.Tensor, bias: torch.Tensor | None, *,
                 in_features: int, group: int, layout: str, decode: Int4Decode | None = None,
                 pack_max_rows: int = UNLIMITED_ROWS) -> None:
        super().__init__()
        self.out_features, self.in_features, self.group = weight_int4.shape[0], in_features, group
        if weight_int4.shape != (self.out_features, in_features // 2):
            raise ValueError(f"int4 weight {list(weight_int4.shape)} does not hold {in_features} inputs")
        self.weight_int4 = frozen(weight_int4.contiguous())                       # [out, in / 2] uint8
        self.weight_scale_zero = frozen(weight_scale_zero.contiguous())           # [in / group, out, 2]
        self.bias = None if bias is None else frozen(bias)                        # [out]
        self.layout = layout
        self.decode = decode if decode is not None and decode.usable(in_features, group) else None
        if layout == INT4_TILED and (self.decode is None or not int4_tileable(self.out_features, in_features, group)):
            raise ValueError(f"tiled int4 weights {list(weight_int4.shape)} need a native decode GEMV that takes them")
        self.pack_max_rows = pack_max_rows
        self._select_kernel()

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, *, group: int, use_aten: bool,
                 release_source: bool = False, decode: Int4Decode | None = None,
                 pack_max_rows: int = UNLIMITED_ROWS) -> Int4Linear:
        """From a float weight [out, in], quantised a block of rows at a time, in the layout int4_layout picks."""
        out_f, in_f = weight.shape
        layout = int4_layout(out_f, in_f, group, use_aten, decode)
        pack, multiple = {INT4_TILED: (tile_int4_codes, Q4_TILE_ROWS), PLAIN: (pack_nibbles, 1)}.get(
            layout, (_aten_pack, ATEN_ROW_TILE))
        packed, scale_zero = quantize_int4_groups(weight.detach(), group, pack=pack, row_multiple=multiple,
                                                  release_source=release_source,
                                                  fit=None if decode is None else decode.fit_groups)
        if layout == INT4_TILED:
            scale_zero = tile_scale_zero(scale_zero)
        return cls(packed, scale_zero, bias, in_features=in_f, group=group, layout=layout, decode=decode,
                   pack_max_rows=pack_max_rows)

    def to_plain(self) -> None:
        """Convert the codes to the plain layout (for a device or process without this layout's kernel)."""
        if self.layout == INT4_TILED:
            self.weight_int4 = frozen(pack_nibbles(untile_int4_codes(self.weight_int4.data)))
            self.weight_scale_zero = frozen(untile_scale_zero(self.weight_scale_zero.data))
            self.layout = PLAIN
        elif self.layout != PLAIN:
            if self.layout != aten_layout():
                raise RuntimeError(f"int4 weights packed as {self.layout} cannot be read in a process whose ATen "
                                   f"layout is {aten_layout()}: quantise again")
            self.weight_int4 = frozen(aten_to_plain(self.weight_int4.data, self.in_features))
            self.layout = PLAIN

    def _select_kernel(self) -> None:
        on_cpu = self.weight_int4.device.type == "cpu"
        readable = self.decode is not None if self.layout == INT4_TILED else self.layout == aten_layout()
        if self.layout != PLAIN and not (on_cpu and readable):
            self.to_plain()
        self._aten = self.layout not in (PLAIN, INT4_TILED)
        self._native = self.decode if self.layout == INT4_TILED else None
        self._gemm = self._native is not None and self._native.prefill_gemm
        multiple = Q4_TILE_ROWS if self.layout == INT4_TILED else 1
        self._dequant_rows = (rows_per_block(self.out_features, self.in_features, multiple) if on_cpu
                              else self.out_features)
        self._widen_into_scratch = on_cpu
        # Prefill through the native GEMM on the dequantised tiles: when some inputs are meant for it and the layer
        # is whole tiles (ATen packs a partial last tile differently).
        tiles = tile_format(self.layout) if self._aten and self.pack_max_rows < UNLIMITED_ROWS else None
        self._tiles = tiles if tiles is not None and self.out_features % tiles.rows == 0 else None

    def _apply(self, fn: Any, recurse: bool = True) -> Int4Linear:
        if self.layout != PLAIN:
            probe = fn(torch.empty(0, dtype=torch.uint8, device=self.weight_int4.device))
            if probe.device != self.weight_int4.device:
                self.to_plain()                # a tiled or ATen layout is read only by this device's kernels
        scale_zero = self.weight_scale_zero.detach()       # the parameter's data is swapped in place
        super()._apply(fn, recurse)
        if self.weight_scale_zero.dtype != scale_zero.dtype:        # a dtype cast of the model: scales keep theirs
            self.weight_scale_zero = frozen(scale_zero.to(self.weight_scale_zero.device))
        self._select_kernel()          # a move to another device picks that device's kernel
        return self

    @property
    def joins_native_call(self) -> bool:
        """Whether this layer can share one native call with others (decode_together, the fused decode step): it
        runs the native kernel over INT4_TILED weights and has no bias (those calls add none)."""
        return self._native is not None and self.layout == INT4_TILED and self.bias is None

    @property
    def kernel(self) -> str:
        if self._native is not None:
            return f"{self._native.name} (decode), native {'int4 x int8 GEMM' if self._gemm else 'dequant'}"
        return "int4pack_mm" if self._aten else "dequant"

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the layer multiplies by, [out, in] in `dtype` (for checks; a full-size copy)."""
        if self.layout == INT4_TILED:
            return self._dequantized_tiles(0, self.out_features, dtype)
        codes = self.weight_int4.data
        if self.layout != PLAIN:
            codes = aten_to_plain(codes, self.in_features)
        return dequantize_int4(unpack_nibbles(codes), self.weight_scale_zero, self.group, slice(None), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:            # x: [..., in] -> [..., out]
        rows = x.numel() // self.in_features
        if self._native is not None and rows <= self._native.max_rows and native_dtype_ok(x.dtype):
            a = as_rows(x, self.in_features)
            y = self._native(a, self.weight_int4, self.weight_scale_zero, self.group).view(*x.shape[:-1], -1)
        elif self._gemm and native_dtype_ok(x.dtype) and not recorded(x):
            a = as_rows(x, self.in_features)
            y = self._native.many(a, [self.weight_int4], [self.weight_scale_zero], self.group,
                                  gemm=True)[0].view(*x.shape[:-1], -1)
        elif self._tiles is not None and rows > self.pack_max_rows:
            y = self._tiled_matmul(x)
        elif self._aten:
            a = x.reshape(-1, self.in_features)
            if a.dtype != torch.bfloat16 or not a.is_contiguous():
                a = a.to(torch.bfloat16, memory_format=torch.contiguous_format)
            y = INT4PACK_MM(a, self.weight_int4, self.group, self.weight_scale_zero).view(*x.shape[:-1], -1)
            if y.dtype != x.dtype:
                y = y.to(x.dtype)
        else:
            y = self._widened_matmul(x)
        return y if self.bias is None else y.add_(self.bias.to(x.dtype))          # y: this call's own output

    def _widened(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        """Rows `rows` of the weight [rows, in] in x's dtype: on CPU dequantised into the reused scratch buffer
        (unless autograd keeps it; PLAIN: transposed, returned as a view), elsewhere a fresh tensor (a GPU's caching
        allocator reuses it)."""
        if self.layout == INT4_TILED:
            return self._widened_tiles(rows, x)
        if not self._widen_into_scratch:
            return dequantize_int4(unpack_nibbles(self.weight_int4[rows]), self.weight_scale_zero[:, rows],
                                   self.group, slice(None), x.dtype)
        packed = self.weight_int4[rows]
        shape = (self.in_features, packed.shape[0])
        out = x.new_empty(shape) if recorded(x) else scratch(shape, x.dtype, x.device)
        half = (self.in_features // 2, packed.shape[0])
        return dequantize_int4_plain(packed, self.weight_scale_zero[:, rows], self.group, out,
                                     codes=scratch(half, torch.uint8, x.device, "codes"),
                                     nibbles=scratch(half, torch.int8, x.device, "nibbles")).T   # [rows, in] view

    def _widened_tiles(self, rows: slice, x: torch.Tensor) -> torch.Tensor:
        """INT4_TILED rows `rows` (whole tiles) of the weight -> [rows, in] in x's dtype (a transposed view on the
        native path)."""
        start, stop, _ = rows.indices(self.out_features)
        if not native_dtype_ok(x.dtype):                                          # e.g. fp16 activations
            return self._dequantized_tiles(start, stop, x.dtype)
        shape = (self.in_features, stop - start)                                  # transposed: see widen_into
        out = x.new_empty(shape) if recorded(x) else scratch(shape, x.dtype, x.device)
        return self._native.widen_into(self.weight_int4, self.weight_scale_zero, self.group, start, out)

    def _dequantized_tiles(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """INT4_TILED rows [start, stop) (whole tiles) untiled in torch and dequantised -> [rows, in] in dtype."""
        tiles = slice(start // Q4_TILE_ROWS, stop // Q4_TILE_ROWS)
        return dequantize_int4(untile_int4_codes(self.weight_int4[start:stop]),
                               untile_scale_zero(self.weight_scale_zero[tiles]), self.group, slice(None), dtype)

    def _widened_matmul(self, x: torch.Tensor) -> torch.Tensor:   # x: [..., in] -> [..., out], no bias
        """The GEMM path of the PLAIN and INT4_TILED layouts: one native GEMM per block of `_dequant_rows` output
        rows (on CPU the whole layer unless it is huge)."""
        step = self._dequant_rows
        if step >= self.out_features:
            return F.linear(x, self._widened(slice(None), x))
        y = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, step):
            rows = slice(start, min(start + step, self.out_features))
            y[..., rows] = F.linear(x, self._widened(rows, x))                                  # [.., rows]
        return y

    def _tiled_matmul(self, x: torch.Tensor) -> torch.Tensor:     # x: [..., in] -> [..., out], no bias
        """The prefill path for ATen's tiled layouts: per block of output rows (the whole layer unless it is huge),
        the weight dequantised into a reused buffer as two transposed halves (see dequantize_int4_tiles), and two
        native GEMMs whose columns are put back in row order."""
        tiles = self._tiles
        assert tiles is not None
        a = x.reshape(-1, self.in_features)                                           # [rows, in]
        y = x.new_empty(a.shape[0], self.out_features)
        step = rows_per_block(self.out_features, self.in_features, tiles.rows)
        for start in range(0, self.out_features, step):
            n = min(step, self.out_features - start)
            shape = (self.in_features, n // 2)
            out = x.new_empty(2, *shape) if recorded(x) else scratch((2, *shape), x.dtype, x.device)
            w = dequantize_int4_tiles(self.weight_int4[start:start + n], self.weight_scale_zero[:, start:start + n],
                                      self.group, tiles.rows, tiles.halves, out=out,
                                      codes=scratch(shape, torch.uint8, x.device, "codes"),
                                      nibbles=scratch(shape, torch.int8, x.device, "nibbles"))   # [2, in, n / 2]
            split = (n // tiles.rows, 2, tiles.rows // 2) if tiles.halves else (n // tiles.rows, tiles.rows // 2, 2)
            dst = y[:, start:start + n].view(a.shape[0], *split)
            for h in (0, 1):
                part = torch.matmul(a, w[h]).view(a.shape[0], n // tiles.rows, tiles.rows // 2)
                if tiles.halves:
                    dst[:, :, h] = part
                else:
                    dst[..., h] = part
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, group={self.group}, bias={self.bias is not None}, "
                f"kernel={self.kernel}, layout={self.layout}")


def int4_layout(out_features: int, in_features: int, group: int, use_aten: bool, decode: Int4Decode | None) -> str:
    """The layout a weight of this shape is stored in: INT4_TILED with a native decode GEMV that takes it, ATen's
    CPU layout when `use_aten` and its kernel takes the shape, else PLAIN."""
    if decode is not None and int4_tileable(out_features, in_features, group):     # covers what decode.usable checks
        return INT4_TILED
    return aten_layout() if use_aten and aten_int4_usable(in_features, out_features, group) else PLAIN


def decode_together(layers: Sequence[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
    """x [..., in] through several INT4_TILED Int4Linear layers of that same input and group size in one native
    call (q/k/v, gate/up: one activation quantisation and one parallel range instead of one per layer, bit-equal to
    one call each; the decode GEMV, or for larger inputs the prefill GEMM where the layers have it), or None where
    that does not apply (other layer types, a bias, another layout, group, dtype or device, a prefill-sized input
    without the GEMM)."""
    first = layers[0]
    if not isinstance(first, Int4Linear) or first._native is None or not native_dtype_ok(x.dtype):
        return None
    rows = x.numel() // first.in_features
    gemm = rows > first._native.max_rows
    if (gemm and (not first._gemm or recorded(x))) or len(layers) > 8:
        return None
    for layer in layers:
        if not (isinstance(layer, Int4Linear) and layer.joins_native_call and layer._native == first._native
                and layer.in_features == first.in_features and layer.group == first.group):
            return None
    a = as_rows(x, first.in_features)
    ys = first._native.many(a, [layer.weight_int4 for layer in layers],
                            [layer.weight_scale_zero for layer in layers], first.group, gemm=gemm)
    return tuple(y.view(*x.shape[:-1], -1) for y in ys)
