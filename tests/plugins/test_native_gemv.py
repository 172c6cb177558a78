"""The native decode GEMV (qvl_plugins/kernels/native/qvl_gemv.c): every ISA build this CPU can run against the
exact dequantised product, and the fallbacks when it cannot be built."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_plugins.kernels import native_gemv
from qvl_plugins.kernels.native_gemv import (
    Int4Decode,
    Int8Decode,
    int4_tileable,
    int8_gemv,
    load_native,
    tile_int4_codes,
    tile_scale_zero,
    untile_int4_codes,
    untile_scale_zero,
)
from qvl_plugins.kernels.quantize import (
    dequantize_int4,
    dequantize_int4_plain,
    pack_nibbles,
    quantize_int4_groups,
    unpack_nibbles,
)
from tests.conftest import cpu_flags

ISAS = {"scalar": (), "avx2": ("avx2", "fma"), "avx512": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl"),
        "avx512_vnni": ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")}


def _runnable(isa: tuple[str, ...]) -> bool:
    return set(isa) <= cpu_flags()


def _together_is_one_by_one(together, layers, x) -> None:
    """`together(layers, x)` (a decode_together) computes every layer's output bit-equal to calling the layer."""
    outputs = together(layers, x)
    assert outputs is not None
    for got, layer in zip(outputs, layers, strict=True):
        assert torch.equal(got, layer(x))                          # same quantised activations, same sums


@pytest.fixture(params=list(ISAS))
def build(request, tmp_path_factory):
    isa = ISAS[request.param]
    if not _runnable(isa):
        pytest.skip(f"this CPU lacks {request.param}")
    b = load_native(isa, str(tmp_path_factory.getbasetemp() / "native"))
    if not b.available and "no C compiler" in b.reason:
        pytest.skip(b.reason)
    assert b.available, b.reason                      # a compiler that cannot build it is a defect
    assert b.isa == request.param
    return b


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3])
def test_int8_kernels_match_the_dequantised_product(build, dtype, rows):
    gen = torch.Generator().manual_seed(0)
    n, k = 37, 192                                    # a tail of rows past the blocks of 4; K a multiple of 64
    w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    x = torch.randn(rows, k, generator=gen).to(dtype)
    want = (x.float() @ w.float().T) * scale
    exact = int8_gemv(build, x, w, scale, 2)
    assert exact.dtype == dtype and exact.shape == (rows, n)
    assert _rel(exact, want) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert _rel(int8_gemv(build, x, w, scale, 2, a8=True), want) < 2e-2      # int8 activations per 64: NEAR


def _quantised_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """The a8 kernels' activation quantisation, written out: per block of `block` columns, scale max|x| / 127 and
    codes round-half-away-from-zero(x · (127 / max|x|)) in [-127, 127]; returned as codes · scale (fp32)."""
    xb = x.float().reshape(x.shape[0], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, 0.0)    # a true division (127 / t is 127 · 1/t)
    t = xb * inv
    codes = ((t.abs() + 0.5).trunc() * t.sign()).clamp(-127, 127)
    return (codes * (amax / 127.0)).reshape(x.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 20])                   # the decode rows on the calling thread, prefill in parallel
def test_int8_activation_quantisation_is_exactly_the_specified_rounding(build, dtype, rows):
    """Through a unit weight each output is one activation's code times its block's scale: the kernel's quantisation
    (vectorised, rows in parallel) is compared bit for bit with the rule written out in torch, half-way values,
    zero blocks and signed zeros included."""
    gen = torch.Generator().manual_seed(3)
    k = 192
    x = torch.randn(rows, k, generator=gen) * 3
    x[:, 0] = 127.0                                        # scale 1 in block 0: the codes are round(x) exactly
    x[:, 1:9] = torch.tensor([2.5, -2.5, 0.5, -0.5, 126.5, -1.5, -0.0, 1.25])    # exact in bf16 too
    x[-1, 64:128] = 0.0                                    # an all-zero block: scale 0, codes 0
    x = x.to(dtype)
    eye = torch.eye(k, dtype=torch.int8)
    got = int8_gemv(build, x, eye, torch.ones(k), 2, a8=True)
    want = _quantised_activations(x, 64).to(dtype)
    assert want[:, 1:9].float().unique(dim=0).tolist() == [[3.0, -3.0, 1.0, -1.0, 127.0, -2.0, 0.0, 1.0]]
    if build.isa == "avx512_vnni":                         # codes made unsigned: the offset comes off in fp32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_int4_kernel_rows_in_one_call_equal_rows_one_by_one(build, dtype):
    """Prefill-sized inputs quantise their rows in parallel: each row's result is the bits it has alone."""
    gen = torch.Generator().manual_seed(4)
    codes, sz = quantize_int4_groups(torch.randn(32, 128, generator=gen), 32, pack=pack_nibbles)
    tiled, tiled_sz = tile_int4_codes(unpack_nibbles(codes)), tile_scale_zero(sz)
    x = torch.randn(20, 128, generator=gen).to(dtype)
    decode = Int4Decode(build)
    together = decode(x, tiled, tiled_sz, 32)
    assert torch.equal(together, torch.cat([decode(x[i:i + 1], tiled, tiled_sz, 32) for i in range(20)]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_tiled_kernel_matches_the_dequantised_product(build, dtype, group):
    gen = torch.Generator().manual_seed(1)
    n, k = 48, 256                                    # three tiles of 16 rows
    codes, sz = quantize_int4_groups(torch.randn(n, k, generator=gen), group, pack=pack_nibbles)
    plain = unpack_nibbles(codes)
    tiled, tiled_sz = tile_int4_codes(plain), tile_scale_zero(sz)
    assert torch.equal(untile_int4_codes(tiled), plain) and torch.equal(untile_scale_zero(tiled_sz), sz)
    weight = dequantize_int4(plain, sz, group, slice(None), torch.float32)
    x = torch.randn(3, k, generator=gen).to(dtype)
    decode = Int4Decode(build)
    got = decode(x, tiled, tiled_sz, group)
    assert got.dtype == dtype and got.shape == (3, n)
    assert _rel(got, x.float() @ weight.T) < 2e-2                   # int8 activations per 32 columns: NEAR
    # the prefill path's widening: bit-equal to the plain layout's dequantisation, from any tile on
    want = torch.empty(k, n, dtype=dtype)
    dequantize_int4_plain(codes, sz, group, want, torch.empty(k // 2, n, dtype=torch.uint8),
                          torch.empty(k // 2, n, dtype=torch.int8))
    out = torch.empty(k, 32, dtype=dtype)
    assert torch.equal(decode.widen_into(tiled, tiled_sz, group, 16, out), want.T[16:48])


def test_int4_tiled_kernel_results_agree_across_isas(tmp_path_factory):
    """The integer dot products are exact and each lane sums in the same order: every ISA gives the same bits."""
    gen = torch.Generator().manual_seed(2)
    codes, sz = quantize_int4_groups(torch.randn(32, 128, generator=gen), 32, pack=pack_nibbles)
    tiled, tiled_sz = tile_int4_codes(unpack_nibbles(codes)), tile_scale_zero(sz)
    x = torch.randn(2, 128, generator=gen)
    where = str(tmp_path_factory.getbasetemp() / "native")
    results = {name: Int4Decode(load_native(isa, where))(x, tiled, tiled_sz, 32)
               for name, isa in ISAS.items() if _runnable(isa)}
    first = next(iter(results.values()))
    for name, y in results.items():
        torch.testing.assert_close(y, first, rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_int4_tiled_kernel_refuses_bad_shapes(build):
    decode = Int4Decode(build)
    with pytest.raises(RuntimeError, match="failed with code 1"):          # 24 rows: not whole tiles of 16
        decode(torch.zeros(1, 64), torch.zeros(24, 32, dtype=torch.uint8), torch.zeros(1, 2, 16, 2), 32)
    assert not decode.usable(64, 48) and decode.usable(64, 32) and not int4_tileable(24, 64, 32)


def test_bad_shapes_are_refused_not_read_out_of_bounds(build):
    w = torch.zeros(4, 96, dtype=torch.int8)                # 96 is not a multiple of the 64-column blocks
    with pytest.raises(RuntimeError, match="failed with code 1"):
        int8_gemv(build, torch.zeros(1, 96), w, torch.ones(4), 1, a8=True)
    assert not Int8Decode(build).usable(96) and Int8Decode(build).usable(128)


def test_no_compiler_means_no_native_kernel_and_the_chain_moves_on(monkeypatch, tmp_path):
    monkeypatch.setattr(native_gemv, "_compiler", lambda: None)
    native_gemv.load_native.cache_clear()
    try:
        b = load_native(ISAS["avx2"], str(tmp_path))
        assert not b.available and "no C compiler" in b.reason
        pipe = make_container(load_config(["hardware=cpu_avx2", "progress=false"])).pipeline()
        kernels = pipe.plan["slots"]["kernels"]
        assert kernels["chosen"] == "int8_weight_only"
        reasons = [r for rejection in kernels["rejected"] if rejection["plugin"] == "int8_dynamic"
                   for r in rejection["reasons"]]
        assert any("native int8 kernel unavailable: no C compiler" in r for r in reasons)
    finally:
        native_gemv.load_native.cache_clear()


def test_a_failing_build_is_reported_with_the_compilers_words(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(native_gemv, "_compiler", lambda: str(fake))
    native_gemv.load_native.cache_clear()
    try:
        b = load_native(ISAS["scalar"], str(tmp_path / "cache"))
        assert not b.available and "this compiler is broken" in b.reason and "(3)" in b.reason
    finally:
        native_gemv.load_native.cache_clear()


def test_disabled_by_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(native_gemv.DISABLE_ENV, "0")
    native_gemv.load_native.cache_clear()
    try:
        assert "disabled" in load_native(ISAS["scalar"], str(tmp_path)).reason
    finally:
        native_gemv.load_native.cache_clear()


@pytest.mark.parametrize("decode_kernel", ["aten", "native"])
def test_int4_plugin_decodes_through_the_chosen_kernel_within_its_fidelity(decode_kernel):
    from qvl_pipeline.facts import RunFacts
    from qvl_pipeline.hardware.probe import probe_machine
    from qvl_plugins.kernels.int4_weight_only import Int4Options, Int4WeightOnlyKernels
    from qvl_plugins.kernels.torch_native import TorchNativeKernels

    facts = RunFacts.example(hardware=probe_machine()[0])
    plugin = Int4WeightOnlyKernels(facts, Int4Options(decode_kernel=decode_kernel), name="int4_weight_only")
    if not (plugin.hw.has_isa("avx2") or plugin.hw.has_isa("avx512f")):
        pytest.skip("this CPU has neither AVX2 nor AVX-512")
    plugin.self_test(TorchNativeKernels(facts, name="torch_native"))       # raises on disagreement
    want = "native" if decode_kernel == "native" and plugin._int4.decode is not None else (
        "aten" if plugin.use_aten else "dequant")
    assert plugin.decode_kernel == want


# --- the tiled int8 layout (one sequential stream per thread) -----------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tiled_weights_decode_and_widen_exactly_like_rows(build, dtype):
    gen = torch.Generator().manual_seed(2)
    n, k = 36, 192
    rows = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    tiled = native_gemv.tile_(build, rows.clone(), 2)
    assert not torch.equal(tiled, rows) and torch.equal(native_gemv.untile(tiled), rows)
    assert torch.equal(tiled[:4].flatten()[64:128], rows[1, :64])          # row 1's first block follows row 0's
    x = torch.randn(3, k, generator=gen).to(dtype)
    assert torch.equal(int8_gemv(build, x, tiled, scale, 2, a8=True, tiled=True),
                       int8_gemv(build, x, rows, scale, 2, a8=True))       # same sums in the same order
    out = torch.empty(8, k, dtype=dtype)
    assert torch.equal(native_gemv.untile_widen(build, tiled, 12, out, 2), rows[12:20].to(dtype))


def test_tiled_shapes_that_do_not_tile_are_refused(build):
    with pytest.raises(RuntimeError, match="tiling failed with code 1"):
        native_gemv.tile_(build, torch.zeros(6, 128, dtype=torch.int8), 1)        # 6 rows: not groups of 4
    with pytest.raises(RuntimeError, match="failed with code 1"):
        int8_gemv(build, torch.zeros(1, 128), torch.zeros(6, 128, dtype=torch.int8), torch.ones(6), 1, a8=True,
                  tiled=True)
    with pytest.raises(RuntimeError, match="untiling failed with code 1"):
        native_gemv.untile_widen(build, torch.zeros(8, 128, dtype=torch.int8), 2, torch.empty(4, 128), 1)
    decode = Int8Decode(build)
    assert decode.layout(8, 128) == native_gemv.TILED
    assert decode.layout(6, 128) == decode.layout(8, 96) == native_gemv.ROWS
    assert Int8Decode(build, "exact").layout(8, 128) == native_gemv.ROWS     # fp32 accumulation keeps rows


def test_an_int8_layer_stores_tiles_for_the_native_gemv_and_every_path_reads_them_as_rows(build):
    from qvl_plugins.kernels.int8_linear import Int8Linear

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(72, 128, generator=gen)
    tiled = Int8Linear.quantize(weight, None, pack_cpu=True, pack_max_rows=4, decode=Int8Decode(build))
    rows = Int8Linear.quantize(weight, None, pack_cpu=False, pack_max_rows=0)       # the exact widened path only
    assert tiled.layout == native_gemv.TILED and rows.layout == native_gemv.ROWS
    assert torch.equal(native_gemv.untile(tiled.weight_int8), rows.weight_int8)
    prefill = torch.randn(2, 9, 128, generator=gen)
    assert torch.equal(tiled(prefill), rows(prefill))                         # widened from tiles, exactly
    recorded = prefill.clone().requires_grad_(True)
    assert torch.equal(tiled(recorded), rows(prefill))                        # the torch untiling (autograd, GPU)
    decode = torch.randn(1, 1, 128, generator=gen)
    assert _rel(tiled(decode), rows(decode).float()) < 2e-2                   # int8 activations: NEAR
    moved = tiled.to("meta")                                                  # off the CPU: rows again
    assert moved.layout == native_gemv.ROWS and moved.weight_int8.shape == (72, 128)
    with pytest.raises(ValueError, match="tiled int8 weight"):
        Int8Linear(tiled.weight_int8, tiled.weight_scale, None, pack_cpu=True, pack_max_rows=4,
                   layout=native_gemv.TILED)                                  # tiles without the GEMV that reads them


def test_an_int4_layer_stores_tiles_for_the_native_gemv_and_every_path_reads_them_as_plain(build):
    from qvl_plugins.kernels.int4_linear import PLAIN, Int4Linear

    gen = torch.Generator().manual_seed(4)
    weight, bias = torch.randn(80, 128, generator=gen), torch.randn(80, generator=gen)
    tiled = Int4Linear.quantize(weight, bias, group=32, use_aten=False, decode=Int4Decode(build))
    plain = Int4Linear.quantize(weight, bias, group=32, use_aten=False)           # the plain dequant path only
    assert tiled.layout == native_gemv.INT4_TILED and plain.layout == PLAIN
    assert tiled.weight_scale_zero.shape == (5, 4, 16, 2)
    assert torch.equal(tiled.dequantize(), plain.dequantize())
    for dtype in (torch.float32, torch.bfloat16):
        prefill = torch.randn(2, 20, 128, generator=gen).to(dtype)                   # 40 rows: past max_rows
        assert torch.equal(tiled(prefill), plain(prefill))                          # widened natively, exactly
        decode = torch.randn(1, 1, 128, generator=gen).to(dtype)
        assert _rel(tiled(decode), plain(decode).float()) < 2e-2                     # int8 activations: NEAR
    half = torch.randn(1, 40, 128, generator=gen).half()
    torch.testing.assert_close(tiled(half), plain(half))                           # fp16: the torch untiling
    recorded = torch.randn(40, 128, generator=gen).requires_grad_(True)
    assert torch.equal(tiled(recorded), plain(recorded.detach()))                   # autograd: a fresh buffer
    odd = Int4Linear.quantize(torch.randn(24, 128, generator=gen), None, group=32, use_aten=False,
                              decode=Int4Decode(build))
    assert odd.layout == PLAIN                                                       # 24 rows: not whole tiles
    moved = tiled.to("meta")                                                         # off the CPU: plain again
    assert moved.layout == PLAIN and moved.weight_scale_zero.shape == (4, 80, 2)
    with pytest.raises(ValueError, match="tiled int4 weights"):
        Int4Linear(tiled.weight_int4, tiled.weight_scale_zero, None, in_features=128, group=32,
                   layout=native_gemv.INT4_TILED)                                   # tiles without their GEMV


# --- the decode step's RMSNorm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 16, 300])      # 300 rows of 128: past MAX_ROWS, RMSNorm's own torch path
def test_native_rms_norm_matches_the_reference_norm(build, dtype, rows):
    from qvl_pipeline.model.norms import RMSNorm
    from qvl_plugins.kernels.native_norm import MAX_ROWS, NativeRMSNorm

    gen = torch.Generator().manual_seed(5)
    ref, mine = RMSNorm(128, 1e-6), NativeRMSNorm(128, 1e-6, build)
    weight = torch.randn(128, generator=gen) * 0.3 + 1
    ref.weight.data, mine.weight.data = weight.to(dtype), weight.to(dtype)
    mine.to(dtype)                                                       # a cast settles the path again
    assert mine.state_dict().keys() == ref.state_dict().keys()
    x = (torch.randn(rows, 128, generator=gen) * 3).to(dtype)
    with torch.no_grad():
        got, want = mine(x), ref(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    if rows > MAX_ROWS:
        assert torch.equal(got, want)
    else:                                   # same roundings, the sum of squares in another order: NEAR
        assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2


def test_layers_of_one_input_decode_together_exactly_as_one_by_one(build):
    from qvl_plugins.kernels.int8_linear import Int8Linear, decode_together

    gen = torch.Generator().manual_seed(6)
    decode = Int8Decode(build)
    layers = [Int8Linear.quantize(torch.randn(n, 128, generator=gen), None, pack_cpu=True, pack_max_rows=4,
                                  decode=decode) for n in (64, 32, 36)]
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 3, 128, generator=gen).to(dtype)
        _together_is_one_by_one(decode_together, layers, x)
    assert decode_together(layers, torch.randn(1, 9, 128)) is None      # prefill-sized: each layer's own path
    plain = Int8Linear.quantize(torch.randn(8, 128, generator=gen), None, pack_cpu=False, pack_max_rows=4)
    assert decode_together([layers[0], plain], torch.randn(1, 1, 128)) is None   # a layer without the native GEMV
    with pytest.raises(RuntimeError, match="failed with code 1"):
        native_gemv.int8_gemv_many(build, torch.zeros(1, 128), [torch.zeros(6, 128, dtype=torch.int8)],
                                   [torch.ones(6)], 1)                  # 6 rows: not tiles


# --- the int8 x int8 prefill GEMM (AVX512-VNNI builds) -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_prefill_gemm_is_the_decode_gemvs_product(build, dtype):
    if not native_gemv.has_int8_gemm(build):
        with pytest.raises(ValueError, match="no int8 prefill GEMM"):
            Int8Decode(build, prefill_gemm=True)
        with pytest.raises(RuntimeError, match="GEMM of 1 weights failed with code 3"):
            native_gemv.int8_gemv_many(build, torch.zeros(9, 128), [torch.zeros(8, 128, dtype=torch.int8)],
                                       [torch.ones(8)], 1, gemm=True)
        pytest.skip(f"the {build.isa} build has no int8 GEMM (AVX512-VNNI only)")
    gen = torch.Generator().manual_seed(7)
    k = 192
    # rows: a tail past the blocks of 6; out features: tails past the panels of 32 and of 16, and whole panels
    weights = [torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8) for n in (36, 100, 64)]
    scales = [torch.rand(w.shape[0], generator=gen) * 0.01 + 1e-3 for w in weights]
    tiled = [native_gemv.tile_(build, w.clone(), 2) for w in weights]
    for m in (1, 6, 13):
        x = (torch.randn(m, k, generator=gen) * torch.logspace(-2, 1, k)).to(dtype)  # blocks of unequal range
        gemm = native_gemv.int8_gemv_many(build, x, tiled, scales, 2, gemm=True)
        gemv = native_gemv.int8_gemv_many(build, x, tiled, scales, 2)
        for got, want, w, s in zip(gemm, gemv, weights, scales, strict=True):
            assert got.dtype == dtype and got.shape == (m, w.shape[0])
            # the same integer sums and scales, added in another order: equal up to fp32 rounding (and one bf16
            # rounding of the result)
            tol = 1e-5 if dtype == torch.float32 else 8e-3
            assert _rel(got, want.float()) < tol
            assert _rel(got, (x.float() @ w.float().T) * s) < 2e-2          # int8 activations per 64: NEAR


def test_an_int8_layer_with_the_prefill_gemm_runs_prefill_through_it(build):
    from qvl_plugins.kernels.int8_linear import Int8Linear, decode_together

    if not native_gemv.has_int8_gemm(build):
        pytest.skip(f"the {build.isa} build has no int8 GEMM (AVX512-VNNI only)")
    gen = torch.Generator().manual_seed(8)
    gemm, plain = Int8Decode(build, prefill_gemm=True), Int8Decode(build)
    weight, bias = torch.randn(72, 128, generator=gen), torch.randn(72, generator=gen)
    layer = Int8Linear.quantize(weight, bias, pack_cpu=True, pack_max_rows=4, decode=gemm)
    exact = Int8Linear.quantize(weight, bias, pack_cpu=False, pack_max_rows=0)        # widened, exact
    assert layer.kernel.endswith("+gemm")
    x = torch.randn(2, 9, 128, generator=gen)
    y = layer(x)
    assert y.shape == (2, 9, 72) and _rel(y, exact(x).float()) < 2e-2                # int8 activations: NEAR
    assert _rel(y - layer.bias, native_gemv.int8_gemv_many(build, x.reshape(18, 128), [layer.weight_int8],
                                                           [layer.weight_scale], 2)[0].view(2, 9, 72)) < 1e-5
    recorded = x.clone().requires_grad_(True)
    assert torch.equal(layer(recorded), exact(x))                 # under autograd: the exact widened weight
    layers = [Int8Linear.quantize(torch.randn(n, 128, generator=gen), None, pack_cpu=True, pack_max_rows=4,
                                  decode=gemm) for n in (64, 36)]
    _together_is_one_by_one(decode_together, layers, x)
    without = Int8Linear.quantize(torch.randn(64, 128, generator=gen), None, pack_cpu=True, pack_max_rows=4,
                                  decode=plain)
    assert not without.kernel.endswith("+gemm") and decode_together([without], x) is None


def test_int8_dynamic_takes_the_prefill_gemm_where_the_cpu_has_vnni_unless_told_to_widen():
    from qvl_pipeline.errors import ConfigError
    from qvl_pipeline.options import build_options
    from qvl_plugins.kernels.int8_dynamic import Int8DynamicKernels, Int8DynamicOptions
    from qvl_plugins.kernels.int8_weight_only import INTEGER_GEMM_PACK_ROWS, NATIVE_BF16_PACK_ROWS
    from tests.conftest import make_facts

    vnni = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
    with pytest.raises(ConfigError, match="prefill_kernel"):
        build_options(Int8DynamicOptions, {"prefill_kernel": "int8"}, "kernels.options.int8_dynamic")
    if not _runnable(("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16")):
        pytest.skip("this CPU lacks AVX512-VNNI or AVX512-BF16")
    facts = make_facts(isa=vnni, stored_dtype="bfloat16")
    if not native_gemv.native_for(facts).available:
        pytest.skip(native_gemv.native_for(facts).reason)
    auto = Int8DynamicKernels(facts)
    assert auto.decode_gemv().prefill_gemm and auto.pack_max_rows == INTEGER_GEMM_PACK_ROWS
    assert auto.compute_dtype(torch.bfloat16) == torch.bfloat16
    widen = Int8DynamicKernels(facts, Int8DynamicOptions(prefill_kernel="widen"))
    assert not widen.decode_gemv().prefill_gemm and widen.pack_max_rows == NATIVE_BF16_PACK_ROWS


def test_the_probe_reports_the_avx512_subsets_the_native_builds_need():
    from qvl_pipeline.hardware.probe import read_cpuinfo

    text = "model name\t: X\nflags\t\t: fpu sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512_vnni\n"
    _, isa = read_cpuinfo(text)
    assert native_gemv.vector_isa(isa) == "avx512_vnni"
    assert native_gemv.vector_isa(tuple(f for f in isa if f != "avx512vl")) == "avx2"     # no VL: no AVX-512 build


def test_int4_layers_of_one_input_decode_together_exactly_as_one_by_one(build):
    from qvl_plugins.kernels.int4_linear import Int4Linear, decode_together

    gen = torch.Generator().manual_seed(9)
    decode = Int4Decode(build)
    layers = [Int4Linear.quantize(torch.randn(n, 128, generator=gen), None, group=32, use_aten=False, decode=decode)
              for n in (64, 32, 48)]
    assert all(layer.layout == native_gemv.INT4_TILED for layer in layers)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(1, 3, 128, generator=gen).to(dtype)
        _together_is_one_by_one(decode_together, layers, x)
    assert decode_together(layers, torch.randn(1, 40, 128, generator=gen)) is None       # prefill: own path
    other_group = Int4Linear.quantize(torch.randn(16, 128, generator=gen), None, group=64, use_aten=False,
                                      decode=decode)
    assert decode_together([layers[0], other_group], torch.randn(1, 1, 128)) is None
    with_bias = Int4Linear.quantize(torch.randn(16, 128, generator=gen), torch.randn(16, generator=gen), group=32,
                                    use_aten=False, decode=decode)
    assert decode_together([layers[0], with_bias], torch.randn(1, 1, 128)) is None


def test_an_int4_layer_with_the_prefill_gemm_runs_prefill_through_it(build):
    from qvl_plugins.kernels.int4_linear import Int4Linear, decode_together

    if not native_gemv.has_int4_gemm(build):
        with pytest.raises(ValueError, match="no int4 prefill GEMM"):
            Int4Decode(build, prefill_gemm=True)
        pytest.skip(f"the {build.isa} build has no int4 GEMM (AVX512-VNNI only)")
    gen = torch.Generator().manual_seed(10)
    gemm = Int4Decode(build, prefill_gemm=True)
    weight, bias = torch.randn(80, 128, generator=gen), torch.randn(80, generator=gen)    # 5 tiles: an odd pair
    layer = Int4Linear.quantize(weight, bias, group=32, use_aten=False, decode=gemm)
    plain = Int4Linear.quantize(weight, bias, group=32, use_aten=False)                    # widened, exact weight
    assert "GEMM" in layer.kernel
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(2, 20, 128, generator=gen) * torch.logspace(-2, 1, 128)).to(dtype)  # 40 rows: prefill
        y = layer(x)
        assert y.dtype == dtype and y.shape == (2, 20, 80)
        assert _rel(y, plain(x).float()) < 2e-2                                  # int8 activations: NEAR
        rows = x.reshape(40, 128)
        gemv = Int4Decode(build)(rows, layer.weight_int4, layer.weight_scale_zero, 32).view(2, 20, 80)
        assert _rel(y - layer.bias.to(dtype), gemv.float()) < (1e-5 if dtype == torch.float32 else 8e-3)
    recorded = torch.randn(40, 128, generator=gen).requires_grad_(True)
    assert torch.equal(layer(recorded), plain(recorded.detach()))                # autograd: the widened weight
    layers = [Int4Linear.quantize(torch.randn(n, 128, generator=gen), None, group=32, use_aten=False, decode=gemm)
              for n in (64, 48)]
    x = torch.randn(1, 40, 128, generator=gen)
    _together_is_one_by_one(decode_together, layers, x)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rounds", [0, 3])
def test_the_native_int4_quantiser_is_the_torch_quantiser(build, group, rounds):
    torch.manual_seed(0)
    weights = (torch.randn(96, 512), torch.distributions.StudentT(4.0).sample((96, 512)) * 0.02,
               torch.full((16, 512), -0.5))                                              # constant groups too
    for w in weights:
        want = quantize_int4_groups(w, group, refit_rounds=rounds)
        got = quantize_int4_groups(w, group, refit_rounds=rounds, fit=Int4Decode(build).fit_groups)
        if rounds == 0:                         # no sums in play: the same bits
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
            continue
        # the group sums may add in another order: a refit may round to a neighbouring bf16 in rare groups
        assert (got[1] != want[1]).float().mean() < 1e-3
        assert (unpack_nibbles(got[0]) != unpack_nibbles(want[0])).float().mean() < 1e-3
        err = [(dequantize_int4(unpack_nibbles(p), sz, group, slice(None), torch.float32) - w).pow(2).sum()
               for p, sz in (got, want)]
        assert abs(err[0] - err[1]) <= 1e-4 * err[1] + 1e-12


def test_the_native_int4_quantiser_refuses_groups_it_cannot_take(build):
    with pytest.raises(RuntimeError, match="failed with code 1"):
        Int4Decode(build).fit_groups(torch.zeros(2, 1, 24), 3)              # not a multiple of 16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [128, 20])                                     # 20: a tail past the vector lanes
def test_decode_attention_over_int8_rows_is_widening_then_attending(build, dtype, d):
    gen = torch.Generator().manual_seed(5)
    k, v = (torch.randint(-127, 128, (2, 2, 40, d), generator=gen, dtype=torch.int8)[:, :, :29] for _ in range(2))
    ks, vs = ((torch.rand(2, 2, 40, 1, generator=gen) * 0.05)[:, :, :29] for _ in range(2))
    q = torch.randn(2, 6, 1, d, generator=gen).to(dtype)
    got = native_gemv.decode_attention(build, q, k, v, d ** -0.5, ks, vs)
    want = native_gemv.decode_attention(build, q, native_gemv.int8_rows_widen(build, k, ks, dtype),
                                        native_gemv.int8_rows_widen(build, v, vs, dtype), d ** -0.5)
    assert torch.equal(got, want)


def _bf16_units_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 values lie between a and b (both bf16; ±0 count as equal), elementwise."""
    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(torch.int16).to(torch.int32)
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_native_tanh_gelu_is_torchs_within_a_last_place(build, dtype):
    """gelu(x, approximate="tanh") in place on every build, against torch's: bf16 results at most one unit apart
    (most equal), fp32 within a few ulp, and ~1e-7 |x| where 1 + tanh cancels; a tail shorter than a vector and
    extreme inputs (inf, -inf and NaN as torch gives them) included."""
    from qvl_plugins.kernels.native_gemv import gelu_tanh_

    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40_000, generator=gen) * 3, torch.linspace(-12, 12, 3001),
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0, 1e4, -1e4])]).to(dtype)   # 43,009: odd tail
    want = torch.nn.functional.gelu(x, approximate="tanh")
    got = x.clone()
    assert gelu_tanh_(build, got) is got
    cancels = (got.float() - want.float()).abs() <= 1.2e-7 * x.float().abs()      # measured: <= 6e-8 |x|
    if dtype == torch.bfloat16:
        apart = _bf16_units_apart(got, want)
        assert bool(((apart <= 1) | cancels).all()) and float((apart == 0).float().mean()) > 0.95
    else:
        assert bool(((got - want).abs() <= 4e-7 * want.abs()).logical_or(cancels).all())   # ~3 ulp
    special = torch.tensor([float("inf"), -float("inf"), float("nan")], dtype=dtype)       # as torch: inf, NaN, NaN
    assert torch.equal(gelu_tanh_(build, special.clone()).isnan(),
                       torch.nn.functional.gelu(special, approximate="tanh").isnan())
    assert special[:1].equal(gelu_tanh_(build, special[:1].clone()))
