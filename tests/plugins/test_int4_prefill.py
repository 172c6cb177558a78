"""Int4 prefill: inputs above the decode kernels' row limits dequantise the codes (plain layout, or ATen's tiled
layouts) into a reused buffer and run the native GEMM. Tile layouts (found from ATen's packer, and both known kinds
built by hand), exactness against the dequantised weights, blocks, autograd, the row limit per CPU, the self-test
and faulty dequantisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qvl_pipeline.slots.base import SelfTestError
from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.kernels import int4_linear, scratch
from qvl_plugins.kernels.int4_linear import (
    UNLIMITED_ROWS,
    Int4Linear,
    TileFormat,
    _aten_permutation,
    aten_layout,
    tile_format,
)
from qvl_plugins.kernels.int4_weight_only import (
    FP32_INT4_PACK_ROWS,
    NATIVE_BF16_INT4_PACK_ROWS,
    Int4Options,
    Int4WeightOnlyKernels,
    default_int4_pack_rows,
)
from qvl_plugins.kernels.native_gemv import INT4_DECODE_ROWS, Int4Decode
from qvl_plugins.kernels.quantize import (
    dequantize_int4,
    dequantize_int4_plain,
    dequantize_int4_tiles,
    pack_nibbles,
    quantize_int4_groups,
    unpack_nibbles,
)
from qvl_plugins.kernels.torch_native import TorchNativeKernels
from tests.conftest import make_facts

NATIVE_BF16 = make_facts(isa=("avx2", "fma", "avx512f", "avx512_bf16"), stored_dtype="bfloat16")
ATEN = Int4Options(decode_kernel="aten")
AVX2 = make_facts()
NATIVE = TorchNativeKernels(AVX2)
needs_aten = pytest.mark.skipif(int4_linear.INT4PACK_MM is None, reason="needs torch's CPU int4 kernel (torch ≥ 2.6)")


def gaussian(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))


def tiled_codes(codes: torch.Tensor, fmt: TileFormat) -> torch.Tensor:
    """Plain codes [out, in] (0..15) packed as `fmt` describes: [out, in / 2] uint8."""
    out_f, in_f = codes.shape
    nibbles = codes.reshape(-1)[fmt.permutation(out_f, in_f)].to(torch.uint8).view(-1, 2)
    return (nibbles[:, 0] | (nibbles[:, 1] << 4)).view(out_f, in_f // 2)


def dequantized_halves(packed, scale_zero, group, fmt, dtype):
    out_f, half_in = packed.shape
    shape = (half_in * 2, out_f // 2)
    return dequantize_int4_tiles(packed, scale_zero, group, fmt.rows, fmt.halves,
                                 out=torch.empty(2, *shape, dtype=dtype), codes=torch.empty(shape, dtype=torch.uint8),
                                 nibbles=torch.empty(shape, dtype=torch.int8))


def plain_transposed(packed, scale_zero, group):
    out_f, half_in = packed.shape
    return dequantize_int4_plain(packed, scale_zero, group, torch.empty(half_in * 2, out_f),
                                 codes=torch.empty(half_in, out_f, dtype=torch.uint8),
                                 nibbles=torch.empty(half_in, out_f, dtype=torch.int8))


@needs_aten
def test_this_process_layout_is_a_known_tiling():
    fmt = tile_format(aten_layout())
    assert fmt is not None
    assert torch.equal(fmt.permutation(256, 16), _aten_permutation(256, 16, aten_layout()))


@pytest.mark.parametrize("fmt", [TileFormat(64, True), TileFormat(32, True), TileFormat(32, False)])
@pytest.mark.parametrize("group", [32, 64])
def test_tiled_dequant_equals_the_plain_dequant(fmt, group):
    w = gaussian(128, 128)
    plain, scale_zero = quantize_int4_groups(w, group)
    codes = unpack_nibbles(plain)                                            # [out, in] 0..15
    want = dequantize_int4(codes, scale_zero, group, slice(None), torch.float32)          # [out, in]
    halves = dequantized_halves(tiled_codes(codes, fmt), scale_zero, group, fmt, torch.float32)
    # Column j of half h is tile j // (rows / 2), row (h, j % (rows / 2)) of it.
    tiles, half = 128 // fmt.rows, fmt.rows // 2
    order = torch.stack([halves[0], halves[1]], dim=0).view(2, 128, tiles, half)         # [h, in, tile, d]
    order = order.permute(2, 0, 3, 1) if fmt.halves else order.permute(2, 3, 0, 1)       # tile, rows in order, in
    assert torch.equal(order.reshape(128, 128), want)                        # every code −8..7 and scale exact


def test_every_byte_value_decodes_to_its_two_codes():
    codes = torch.stack(torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij"), -1).reshape(-1)
    codes = codes.view(64, 8)                                               # all 256 (low, high) pairs, 64 rows
    fmt = TileFormat(64, True)
    ones = torch.zeros(1, 64, 2, dtype=torch.bfloat16)
    ones[..., 0] = 1                                                         # scale 1, zero 0: w = q − 8
    halves = dequantized_halves(tiled_codes(codes, fmt), ones, 8, fmt, torch.float32)        # one group of 8
    got = torch.cat([halves[0], halves[1]], dim=1).T                         # [64 rows, 8 inputs]
    assert torch.equal(got, codes.float() - 8)


@pytest.mark.parametrize("group", [32, 64])
def test_plain_dequant_is_exact(group):
    w = gaussian(48, 128)
    plain, scale_zero = quantize_int4_groups(w, group)
    want = dequantize_int4(unpack_nibbles(plain), scale_zero, group, slice(None), torch.float32)
    got = plain_transposed(plain, scale_zero, group)
    assert torch.equal(got.T, want)                                          # transposed: [in, out]
    codes = torch.arange(256).remainder(16).view(16, 16)                     # every code in both nibble positions
    ones = torch.zeros(1, 16, 2, dtype=torch.bfloat16)
    ones[..., 0] = 1                                                         # scale 1, zero 0: w = q − 8
    got = plain_transposed(pack_nibbles(codes), ones, 16)
    assert torch.equal(got.T, codes.float() - 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plain_layout_prefill_matches_the_dequantised_weights(dtype, monkeypatch):
    w, b = gaussian(96, 128), torch.randn(96)
    layer = Int4Linear.quantize(w, b, group=32, use_aten=False)
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(1))
    exact = F.linear(x, layer.dequantize(), b)
    got = layer(x.to(dtype))
    assert got.dtype == dtype and got.shape == (2, 7, 96)
    assert relative_error(got, exact) < (1e-5 if dtype == torch.float32 else 1e-2)
    monkeypatch.setattr(scratch, "MAX_ELEMENTS", 40 * 128)
    layer._select_kernel()
    assert layer._dequant_rows == 40                                         # 40 + 40 + 16 rows
    assert relative_error(layer(x.to(dtype)), got) < 1e-6


def test_plain_layout_prefill_under_autograd_keeps_its_own_weights():
    layer = Int4Linear.quantize(gaussian(64, 64), None, group=32, use_aten=False)
    other = Int4Linear.quantize(gaussian(64, 64, seed=1), None, group=32, use_aten=False)
    x = torch.randn(6, 64, requires_grad=True)
    y = layer(x)
    other(torch.randn(6, 64))                                                # overwrites the scratch buffer
    y.sum().backward()
    assert torch.allclose(x.grad, layer.dequantize().sum(0).expand(6, 64), atol=1e-4)


@needs_aten
@pytest.mark.parametrize("group", [32, 128])
def test_prefill_rows_match_the_dequantised_weights(group):
    w, b = gaussian(192, 256), torch.randn(192)
    layer = Int4Linear.quantize(w, b, group=group, use_aten=True, pack_max_rows=4)
    assert layer._tiles is not None
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(1))          # 10 rows > 4
    exact = F.linear(x, layer.dequantize(), b)
    got = layer(x)
    assert got.shape == (2, 5, 192) and relative_error(got, exact) < 1e-5           # fp32: summation order only
    bf16 = layer(x.bfloat16())
    assert bf16.dtype == torch.bfloat16 and relative_error(bf16, exact) < 1e-2     # measured 3.4e-3
    gemv = layer(x[:, :2])                                                           # 4 rows: ATen's kernel
    assert relative_error(gemv, exact[:, :2]) < 1e-2


@needs_aten
def test_huge_layers_go_a_block_of_tiles_at_a_time(monkeypatch):
    layer = Int4Linear.quantize(gaussian(256, 128), None, group=32, use_aten=True, pack_max_rows=0)
    x = torch.randn(3, 128)
    whole = layer(x)
    monkeypatch.setattr(scratch, "MAX_ELEMENTS", 64 * 128)                           # one tile per block
    assert scratch.rows_per_block(256, 128, layer._tiles.rows) == layer._tiles.rows
    assert relative_error(layer(x), whole) < 1e-6


@needs_aten
def test_partial_tiles_and_unlimited_rows_stay_on_atens_kernel():
    odd = Int4Linear.quantize(gaussian(112, 128), None, group=32, use_aten=True, pack_max_rows=0)
    assert odd._tiles is None                                                # 112 rows: the last tile is partial
    assert odd(torch.randn(9, 128)).isfinite().all()
    assert Int4Linear.quantize(gaussian(128, 128), None, group=32, use_aten=True)._tiles is None


@needs_aten
def test_prefill_under_autograd_keeps_its_own_weights():
    layer = Int4Linear.quantize(gaussian(128, 64), None, group=32, use_aten=True, pack_max_rows=0)
    x = torch.randn(6, 64, requires_grad=True)
    layer(x).sum().backward()
    other = Int4Linear.quantize(gaussian(128, 64, seed=1), None, group=32, use_aten=True, pack_max_rows=0)
    grad = x.grad.clone()
    x.grad = None
    y = layer(x)
    other(torch.randn(6, 64))                                                # overwrites the scratch buffer
    y.sum().backward()
    assert torch.equal(x.grad, grad)
    assert torch.allclose(grad, layer.dequantize().sum(0).expand(6, 64), atol=1e-4)


def test_row_limit_follows_the_compute_dtype():
    bf16, fp32 = torch.bfloat16, torch.float32
    assert default_int4_pack_rows(NATIVE_BF16.hardware, bf16) == NATIVE_BF16_INT4_PACK_ROWS
    assert default_int4_pack_rows(make_facts(isa=("avx2", "amx_bf16")).hardware, bf16) == NATIVE_BF16_INT4_PACK_ROWS
    assert default_int4_pack_rows(AVX2.hardware, bf16) == UNLIMITED_ROWS         # emulated bf16: ATen takes all
    assert default_int4_pack_rows(AVX2.hardware, fp32) == FP32_INT4_PACK_ROWS
    assert default_int4_pack_rows(NATIVE_BF16.hardware, fp32) == FP32_INT4_PACK_ROWS
    avx2_bf16 = make_facts(stored_dtype="bfloat16")
    assert Int4WeightOnlyKernels(avx2_bf16, ATEN)._int4.pack_max_rows == FP32_INT4_PACK_ROWS     # auto: fp32
    assert Int4WeightOnlyKernels(avx2_bf16, Int4Options(compute_dtype="stored"))._int4.pack_max_rows == UNLIMITED_ROWS
    assert Int4WeightOnlyKernels(AVX2, Int4Options(int4_pack_max_rows=7))._int4.pack_max_rows == 7


@needs_aten
def test_plugin_layers_take_the_prefill_path_and_self_test_covers_it():
    kernels = Int4WeightOnlyKernels(NATIVE_BF16, ATEN)
    assert kernels._test_rows[-1] == NATIVE_BF16_INT4_PACK_ROWS + 1
    layer = kernels.prepare(kernels.linear(256, 128, True))
    assert isinstance(layer, Int4Linear) and layer.pack_max_rows == NATIVE_BF16_INT4_PACK_ROWS
    assert layer._tiles is not None
    kernels.self_test(NATIVE)


@needs_aten
def test_faulty_tiling_fails_self_test(monkeypatch):
    """A plausible bug: the prefill path reads a tile's two nibbles as the wrong rows."""
    real = tile_format(aten_layout())
    monkeypatch.setattr(int4_linear, "tile_format", lambda layout: TileFormat(real.rows, not real.halves))
    with pytest.raises(SelfTestError, match=f"{NATIVE_BF16_INT4_PACK_ROWS + 1} row"):
        Int4WeightOnlyKernels(NATIVE_BF16, ATEN).self_test(NATIVE)


def test_faulty_plain_dequant_fails_self_test(monkeypatch):
    """A plausible bug: the plain layout's dequantisation (a CPU with neither ATen's nor the native kernel) swaps each
    byte's two codes."""
    real = int4_linear.dequantize_int4_plain

    def swapped(packed, *args, **kwargs):
        return real((packed << 4) | (packed >> 4), *args, **kwargs)

    monkeypatch.setattr(int4_linear, "dequantize_int4_plain", swapped)
    kernels = Int4WeightOnlyKernels(make_facts(isa=()), Int4Options())
    assert kernels.decode_kernel == "dequant"
    with pytest.raises(SelfTestError, match=r"row.*relative error"):
        kernels.self_test(NATIVE)


def test_faulty_tiled_widening_fails_self_test(monkeypatch):
    """A plausible bug: the native prefill widening of the tiled layout swaps each byte's two codes."""
    kernels = Int4WeightOnlyKernels(NATIVE_BF16, Int4Options(decode_kernel="native"))
    if kernels.decode_kernel != "native":
        pytest.skip("the native kernel does not build here: no tiled layout to check")
    real = Int4Decode.widen_into

    def swapped(self, codes, *args, **kwargs):
        return real(self, (codes << 4) | (codes >> 4), *args, **kwargs)

    monkeypatch.setattr(Int4Decode, "widen_into", swapped)
    with pytest.raises(SelfTestError, match=r"(33|40) row\(s\).*relative error"):
        kernels.self_test(NATIVE)


def test_without_the_int4_gemm_or_native_bf16_the_gemv_takes_every_row(monkeypatch):
    """AVX2: the native int4 GEMV takes prefill-sized inputs too (faster than fp32 widened weights there); where the
    int4 GEMM or native bf16 exists, or with prefill_kernel=widen, inputs past INT4_DECODE_ROWS take the GEMM path."""
    kernels = Int4WeightOnlyKernels(AVX2, Int4Options())
    if kernels.decode_kernel != "native":
        pytest.skip("the native kernel does not build here")
    assert kernels._int4.decode.max_rows == UNLIMITED_ROWS and not kernels._int4.decode.prefill_gemm
    assert Int4WeightOnlyKernels(AVX2, Int4Options(prefill_kernel="widen"))._int4.decode.max_rows == INT4_DECODE_ROWS
    assert Int4WeightOnlyKernels(NATIVE_BF16, Int4Options())._int4.decode.max_rows == INT4_DECODE_ROWS
    layer = kernels.prepare(kernels.linear(256, 128, False))
    x = torch.randn(3, 40, 256, generator=torch.Generator().manual_seed(5))        # 120 rows: a prefill
    calls = []
    real = Int4Decode.__call__

    def counted(self, a, *args, **kwargs):
        calls.append(a.shape[0])
        return real(self, a, *args, **kwargs)

    monkeypatch.setattr(Int4Decode, "__call__", counted)
    y = layer(x)
    assert calls == [120]
    assert relative_error(y, F.linear(x, layer.dequantize())) < 0.02   # only the activations' int8 rounding
    monkeypatch.undo()
    kernels.self_test(NATIVE)                               # its 40-row input runs the same GEMV
