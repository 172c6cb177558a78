"""The quantised kernels plugins' compute_dtype option: the auto rule (fp32 where the computing device has no native
16-bit arithmetic, the stored dtype where it has), explicit values, bad values, and the reason the plan prints."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.effective import reconcile
from qvl_pipeline.options import build_options
from qvl_pipeline.slots.kernels import KernelsBackend, choose_compute_dtype
from qvl_plugins.kernels.fp16_store import Fp16StoreFp32ComputeKernels
from qvl_plugins.kernels.fp32_compute import Fp32ComputeKernels
from qvl_plugins.kernels.int4_weight_only import Int4Options, Int4WeightOnlyKernels
from qvl_plugins.kernels.int8_dynamic import Int8DynamicKernels
from qvl_plugins.kernels.int8_weight_only import Int8Options, Int8WeightOnlyKernels, QuantizableLinear
from qvl_plugins.kernels.native_gemv import native_for
from qvl_plugins.kernels.torch_native import TorchNativeKernels
from tests.conftest import AMPERE, PASCAL, make_facts, make_profile

AVX2 = ("sse4_2", "avx", "avx2", "fma", "f16c")
AVX512_BF16 = (*AVX2, "avx512f", "avx512_bf16", "avx512_vnni")
AMX = (*AVX512_BF16, "amx_tile", "amx_bf16", "amx_int8")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize(("isa", "gpu", "stored", "want", "says"), [
    (AVX2, None, BF16, FP32, "this CPU has no native bfloat16 (no AVX512-BF16/AMX)"),
    (AVX512_BF16, None, BF16, BF16, "native on this CPU (AVX512-BF16)"),
    (AMX, None, BF16, BF16, "native on this CPU (AMX-BF16)"),
    (AVX512_BF16, None, FP16, FP32, "this CPU has no native float16"),       # no fp16 arithmetic flag is probed
    (AVX2, None, FP32, FP32, "the checkpoint's dtype"),
    (AVX512_BF16, PASCAL, BF16, FP32, "this GPU has no native bfloat16 (sm_61; needs sm_80+)"),
    (AVX2, AMPERE, BF16, BF16, "native on this GPU (sm_86)"),
    (AVX2, PASCAL, FP16, FP32, "this GPU has no native float16 (sm_61; needs sm_70+)"),
])
def test_auto_rule(isa, gpu, stored, want, says):
    choice = choose_compute_dtype("auto", stored, make_profile(isa=isa, gpu=gpu))
    assert choice.dtype == want
    assert says in choice.reason


@pytest.mark.parametrize(("option", "stored", "want"), [
    ("stored", BF16, BF16), ("stored", FP16, FP16), ("float32", BF16, FP32), ("bfloat16", FP32, BF16),
    ("float16", BF16, FP16),
])
def test_explicit_values_win_over_the_machine(option, stored, want):
    for isa in (AVX2, AVX512_BF16):
        choice = choose_compute_dtype(option, stored, make_profile(isa=isa))
        assert choice.dtype == want and option in choice.reason


def test_an_emulated_avx2_profile_counts_as_avx2_and_an_unemulated_one_as_this_cpu():
    laptop = make_profile("i5", isa=AVX2)
    here = make_profile("here", isa=AVX512_BF16)
    emulated, _ = reconcile(laptop, here, emulate=True)
    plain, _ = reconcile(laptop, here, emulate=False)
    assert choose_compute_dtype("auto", BF16, emulated).dtype == FP32
    assert choose_compute_dtype("auto", BF16, plain).dtype == BF16            # the CPU that really runs has bf16


@pytest.mark.parametrize("plugin", [Int8WeightOnlyKernels, Int8DynamicKernels, Int4WeightOnlyKernels])
def test_quantised_plugins_default_to_auto(plugin):
    assert plugin.Options().compute_dtype == "auto"
    stored = plugin(make_facts(isa=AVX2), plugin.Options(compute_dtype="stored"))
    assert stored.compute_dtype(BF16) == BF16


@pytest.mark.parametrize("plugin", [Int8WeightOnlyKernels, Int4WeightOnlyKernels])
def test_plugins_that_multiply_in_the_activation_dtype_follow_the_rule(plugin):
    for isa, want in ((AVX2, FP32), (AVX512_BF16, BF16)):
        kernels = plugin(make_facts(isa=isa, stored_dtype="bfloat16"))
        assert kernels.compute_dtype(BF16) == want
        assert kernels.compute(BF16).describe().startswith(str(want).removeprefix("torch.") + ": ")
        assert kernels.compute_dtype(FP32) == FP32


@pytest.mark.skipif(not native_for(make_facts(isa=AVX2)).available,
                    reason="needs the native int8 kernel (a C compiler)")
def test_int8_dynamic_keeps_bf16_on_avx2_where_its_integer_kernel_takes_every_row():
    kernels = Int8DynamicKernels(make_facts(isa=AVX2, stored_dtype="bfloat16"))
    assert kernels.pack_max_rows > 10**9
    choice = kernels.compute(BF16)
    assert choice.dtype == BF16 and "every matmul runs through the integer kernel" in choice.reason
    native = Int8DynamicKernels(make_facts(isa=AVX512_BF16, stored_dtype="bfloat16"))
    assert native.compute_dtype(BF16) == BF16 and native.pack_max_rows == 32
    assert kernels.compute_dtype(FP16) == FP32             # fp16 activations would miss the integer kernel
    explicit = Int8DynamicKernels(make_facts(isa=AVX2), Int8DynamicKernels.Options(compute_dtype="float32"))
    assert explicit.compute_dtype(BF16) == FP32 and explicit.pack_max_rows > 10**9   # the integer kernel still wins


def test_integer_matmuls_do_not_keep_bf16_on_a_gpu_without_it():
    assert choose_compute_dtype("auto", BF16, make_profile(isa=AVX2, gpu=PASCAL), integer_matmuls=True).dtype == FP32
    assert choose_compute_dtype("auto", BF16, make_profile(isa=AVX2), integer_matmuls=True).dtype == BF16


def test_other_plugins_say_why():
    facts = make_facts(isa=AVX2)
    assert TorchNativeKernels(facts).compute(BF16).describe() == "bfloat16: the checkpoint's dtype"
    assert Fp32ComputeKernels(facts).compute(BF16).describe().startswith("float32: fp32_compute")
    assert Fp16StoreFp32ComputeKernels(facts).compute(BF16).describe().startswith("float32: fp16_store")

    class Upcasting(KernelsBackend):                  # a third-party plugin that only overrides compute_dtype
        def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
            return FP32

    assert Upcasting(facts, name="mine").compute(BF16).describe() == "float32: chosen by mine"


@pytest.mark.parametrize("options", [Int8Options, Int4Options])
def test_a_bad_compute_dtype_is_one_config_line_naming_the_key(options):
    with pytest.raises(ConfigError) as info:
        build_options(options, {"compute_dtype": "int8"}, "kernels.options.int8_weight_only")
    message = str(info.value)
    assert "kernels.options.int8_weight_only" in message and "'int8'" in message and "auto" in message
    assert "\n" not in info.value.message


def test_an_unquantised_layer_takes_any_activation_dtype_and_keeps_its_stored_weight():
    # The output head with quantize_head=false stays a QuantizableLinear: fp32 activations meet its bf16 weight.
    layer = QuantizableLinear(16, 8, bias=True).to(BF16)
    x = torch.randn(3, 16)
    out = layer(x)
    assert out.dtype == FP32 and layer.weight.dtype == BF16
    want = torch.nn.functional.linear(x.to(BF16), layer.weight, layer.bias).float()
    assert torch.equal(out, want)
    assert torch.equal(layer(x.to(BF16)), torch.nn.functional.linear(x.to(BF16), layer.weight, layer.bias))
