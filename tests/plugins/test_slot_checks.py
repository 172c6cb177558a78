"""The public slot checkers (qvl_pipeline.slots.checks): each passes the built-in plugins of its slot and rejects a
faulty one with a SelfTestError that names what disagreed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.slots.base import SelfTestError
from qvl_pipeline.slots.checks import check_attention, check_kernels, check_kv_cache, check_memory, check_rotary
from qvl_pipeline.slots.memory import Placement
from qvl_plugins.attention.chunked import ChunkedAttention, ChunkedOptions
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.attention.sdpa import SdpaAttention
from qvl_plugins.attention.sdpa_flash import SdpaFlashAttention
from qvl_plugins.attention.sdpa_mem_efficient import SdpaMemEfficientAttention
from qvl_plugins.kernels.fp16_store import Fp16StoreFp32ComputeKernels
from qvl_plugins.kernels.fp32_compute import Fp32ComputeKernels
from qvl_plugins.kernels.int8_weight_only import Int8WeightOnlyKernels
from qvl_plugins.kernels.torch_native import TorchNativeKernels
from qvl_plugins.kv_cache.dynamic import DynamicCache, DynamicOptions
from qvl_plugins.kv_cache.int8 import Int8KVCache
from qvl_plugins.kv_cache.static import StaticCache
from qvl_plugins.memory.cpu import CpuMemory
from qvl_plugins.memory.cuda_full import CudaFullMemory
from qvl_plugins.memory.cuda_partial import CudaPartialMemory, CudaPartialOptions
from qvl_plugins.rotary.cached import CachedRotary
from qvl_plugins.rotary.reference import ReferenceRotary, rotate_half
from tests.conftest import AMPERE, PASCAL, make_facts

FACTS = make_facts()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _sm() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


# --- attention ---------------------------------------------------------------------------------------------------

EAGER = EagerAttention(FACTS)


@pytest.mark.parametrize("plugin", [EAGER, SdpaAttention(FACTS), ChunkedAttention(FACTS),
                                    ChunkedAttention(FACTS, ChunkedOptions(chunk_size=2))],
                         ids=["eager", "sdpa", "chunked", "chunked-2"])
def test_check_attention_passes_the_cpu_plugins(plugin):
    worst = check_attention(plugin, EAGER)
    assert 0.0 <= worst <= 1e-5


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_check_attention_passes_mem_efficient_on_cuda(dtype):
    check_attention(SdpaMemEfficientAttention(FACTS), EAGER, "cuda", dtype)


@needs_cuda
@pytest.mark.skipif(_sm() < (8, 0), reason="needs CUDA sm_80+ (FlashAttention)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_check_attention_passes_flash_on_cuda(dtype):
    check_attention(SdpaFlashAttention(FACTS), EAGER, "cuda", dtype)


class HeadsFirstAttention(EagerAttention):
    """A plausible bug: returns [b, h, q, d] (SDPA's own layout) where the slot promises [b, q, h, d]."""

    def attend(self, q, k, v, *, causal, scale):
        return super().attend(q, k, v, causal=causal, scale=scale).transpose(1, 2)


def test_check_attention_rejects_the_wrong_layout():
    # The first case is a decode step: 4 heads, 1 query of head_dim 16.
    with pytest.raises(SelfTestError, match=r"shape \(1, 4, 1, 16\) differs from the reference's \(1, 1, 4, 16\)"):
        check_attention(HeadsFirstAttention(FACTS), EAGER)


class UnscaledAttention(EagerAttention):
    """A plausible bug: the softmax scale is ignored (same shapes, wrong numbers)."""

    def attend(self, q, k, v, *, causal, scale):
        return super().attend(q, k, v, causal=causal, scale=1.0)


def test_check_attention_names_the_case_that_disagreed():
    with pytest.raises(SelfTestError, match=r"attend\(q_len=1, kv_len=9, heads=4/2, causal=True\): relative error"):
        check_attention(UnscaledAttention(FACTS), EAGER)


# --- rotary --------------------------------------------------------------------------------------------------------

ROTARY = ReferenceRotary(FACTS)


@pytest.mark.parametrize("plugin", [ROTARY, CachedRotary(FACTS)], ids=["reference", "cached"])
def test_check_rotary_passes_the_builtin_plugins(plugin):
    assert check_rotary(plugin, ROTARY) == 0.0                 # both are bit-equal to the reference


class SignFlippedApply(ReferenceRotary):
    """A plausible bug: x·cos − rotate_half(x)·sin (rotation by −θ)."""

    def apply(self, q, k, cos, sin, *, upcast):
        work = torch.float32 if upcast else q.dtype
        cos, sin = cos.to(work), sin.to(work)
        qw, kw = q.to(work), k.to(work)
        return (qw * cos - rotate_half(qw) * sin).to(q.dtype), (kw * cos - rotate_half(kw) * sin).to(k.dtype)


class NegatedSinTables(ReferenceRotary):
    """A plausible bug: the text sin table built with the wrong sign."""

    def text_tables(self, position_ids, inv_freq, mrope_section):
        cos, sin = super().text_tables(position_ids, inv_freq, mrope_section)
        return cos, -sin


@pytest.mark.parametrize(("faulty", "message"), [
    (SignFlippedApply, r"apply\(upcast=True\) q: relative error"),
    (NegatedSinTables, r"text_tables \(positions < 40\) sin: relative error"),
])
def test_check_rotary_rejects_a_sign_error(faulty, message):
    with pytest.raises(SelfTestError, match=message):
        check_rotary(faulty(FACTS), ROTARY)


# --- kernels -------------------------------------------------------------------------------------------------------

NATIVE = TorchNativeKernels(FACTS)


@pytest.mark.parametrize(("plugin", "tol"), [(NATIVE, 0.0), (Fp32ComputeKernels(FACTS), 1e-5),
                                             (Fp16StoreFp32ComputeKernels(FACTS), 2e-2),
                                             (Int8WeightOnlyKernels(FACTS), 2e-2)],
                         ids=["torch_native", "fp32_compute", "fp16_store", "int8_weight_only"])
def test_check_kernels_passes_the_builtin_plugins(plugin, tol):
    assert 0.0 <= check_kernels(plugin, NATIVE) <= tol


class BiasIgnoredLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight)


class BiasIgnoredKernels(TorchNativeKernels):
    """A plausible bug: the linear keeps a bias parameter (so the checkpoint loads) but never adds it."""

    def linear(self, in_features, out_features, bias):
        return BiasIgnoredLinear(in_features, out_features, bias=bias)


class BiasDroppedKernels(TorchNativeKernels):
    """A plausible bug: the linear is built without its bias, so the checkpoint's bias has nowhere to go."""

    def linear(self, in_features, out_features, bias):
        return nn.Linear(in_features, out_features, bias=False)


@pytest.mark.parametrize(("faulty", "message"), [
    (BiasIgnoredKernels, r"linear on cpu, 1 row\(s\): relative error"),
    (BiasDroppedKernels, r"(?s)BiasDroppedKernels self-test on cpu failed: .*Unexpected key\(s\).*\"bias\""),
])
def test_check_kernels_rejects_a_linear_without_its_bias(faulty, message):
    with pytest.raises(SelfTestError, match=message):
        check_kernels(faulty(FACTS), NATIVE)


class ErfGeluKernels(TorchNativeKernels):
    """A plausible bug: every GELU name gets the exact (erf) GELU, not the tanh approximation the config names."""

    def activation(self, name):
        return F.gelu if name.startswith("gelu") else super().activation(name)


def test_check_kernels_rejects_the_wrong_activation():
    with pytest.raises(SelfTestError, match=r"activation gelu_pytorch_tanh on cpu in torch.float32: relative error"):
        check_kernels(ErfGeluKernels(FACTS), NATIVE)


def test_the_native_plugins_give_the_vision_tower_the_native_tanh_gelu_and_it_passes_their_self_test():
    """int8_dynamic and int4_weight_only hand the vision MLP the native in-place GELU where the library builds (the
    self-test compares it with torch's), and the decoder's SiLU stays torch's."""
    from qvl_pipeline import Pipeline
    from qvl_pipeline.model.vision_blocks import VisionMLP
    from qvl_plugins.kernels.native_activation import NativeTanhGelu

    for level in ("moderate", "aggressive"):
        pipe = Pipeline.from_overrides(["progress=false", "model=tiny", f"opt={level}", "opt.self_test=true"])
        mlps = [m for m in pipe.model.modules() if isinstance(m, VisionMLP)]
        assert mlps and all(isinstance(m._act, NativeTanhGelu) for m in mlps), level
        assert pipe.model.model.language_model.layers[0].mlp._act is F.silu


# --- kv cache ------------------------------------------------------------------------------------------------------

STATIC = StaticCache(FACTS)


@pytest.mark.parametrize(("plugin", "tol"), [(STATIC, 0.0), (DynamicCache(FACTS), 0.0),
                                             (DynamicCache(FACTS, DynamicOptions(initial_len=1)), 0.0),
                                             (Int8KVCache(FACTS), 2e-2)],
                         ids=["static", "dynamic", "dynamic-1", "int8"])
def test_check_kv_cache_passes_the_builtin_plugins(plugin, tol):
    assert 0.0 <= check_kv_cache(plugin, STATIC) <= tol


@needs_cuda
@pytest.mark.parametrize("plugin", [STATIC, DynamicCache(FACTS, DynamicOptions(initial_len=1)), Int8KVCache(FACTS)],
                         ids=["static", "dynamic-1", "int8"])
def test_check_kv_cache_passes_on_cuda(plugin):
    check_kv_cache(plugin, STATIC, "cuda")


class NoTruncateCache(StaticCache):
    """A plausible bug: truncate is a no-op, so a retry after an edit keeps the discarded positions."""

    def create(self, shape, dtype, devices):
        cache = super().create(shape, dtype, devices)
        cache.truncate = lambda n: None
        return cache


def test_check_kv_cache_rejects_a_no_op_truncate():
    # KV_SCRIPT: prefill 5 + decode 1 committed, 3 more appended, then truncate(4).
    with pytest.raises(SelfTestError, match="after step 2 length is 6, the reference's 4"):
        check_kv_cache(NoTruncateCache(FACTS), STATIC)


# --- memory --------------------------------------------------------------------------------------------------------

CPU_MEMORY = CpuMemory(FACTS)


@pytest.mark.parametrize("plugin", [CPU_MEMORY, CudaFullMemory(make_facts(gpu=AMPERE)),
                                    CudaPartialMemory(make_facts(gpu=PASCAL)),
                                    CudaPartialMemory(make_facts(gpu=PASCAL), CudaPartialOptions(gpu_layers=1))],
                         ids=["cpu", "cuda_full", "cuda_partial", "cuda_partial-1"])
def test_check_memory_passes_the_builtin_plugins(plugin):
    assert check_memory(plugin, CPU_MEMORY) == 0.0


class OneLayerShortMemory(CpuMemory):
    """A plausible bug: an off-by-one drops the last decoder layer from the placement."""

    def place(self, layer_bytes, vision_bytes, embed_bytes, head_bytes):
        placement = super().place(layer_bytes, vision_bytes, embed_bytes, head_bytes)
        return Placement(placement.vision, placement.embed, placement.head, placement.layers[:-1])


def test_check_memory_rejects_the_wrong_number_of_layers():
    # The tiny model of make_facts has two decoder layers.
    with pytest.raises(SelfTestError, match="placed 1 decoder layers; the model has 2"):
        check_memory(OneLayerShortMemory(FACTS), CPU_MEMORY)


class NoSuchDeviceMemory(CpuMemory):
    def place(self, layer_bytes, vision_bytes, embed_bytes, head_bytes):
        placement = super().place(layer_bytes, vision_bytes, embed_bytes, head_bytes)
        return Placement(placement.vision, "gpu0", placement.head, placement.layers)


def test_check_memory_rejects_a_device_torch_does_not_know():
    with pytest.raises(SelfTestError, match=r"NoSuchDeviceMemory self-test failed: .*gpu0"):
        check_memory(NoSuchDeviceMemory(FACTS), CPU_MEMORY)


# --- the slots' default self_test goes through the checkers ------------------------------------------------------

@pytest.mark.parametrize(("faulty", "reference"), [
    (HeadsFirstAttention(FACTS), EAGER), (SignFlippedApply(FACTS), ROTARY), (BiasIgnoredKernels(FACTS), NATIVE),
    (NoTruncateCache(FACTS), STATIC), (OneLayerShortMemory(FACTS), CPU_MEMORY),
], ids=["attention", "rotary", "kernels", "kv_cache", "memory"])
def test_default_self_test_uses_the_slot_checker(faulty, reference):
    with pytest.raises(SelfTestError):
        faulty.self_test(reference)
