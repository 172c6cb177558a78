"""Attention plugins: parity with eager attention, chunk memory bound, validate reasons, self-tests, faults."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.profile import GpuFacts
from qvl_pipeline.options import build_options
from qvl_pipeline.slots.base import NoOptions, SelfTestError
from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.attention.chunked import ChunkedAttention, ChunkedOptions
from qvl_plugins.attention.cuda_sdpa import forced_sdpa
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.attention.sdpa_flash import SdpaFlashAttention
from qvl_plugins.attention.sdpa_mem_efficient import SdpaMemEfficientAttention
from tests.conftest import AMPERE, PASCAL, PASCAL_NO_KERNELS, make_facts

FACTS = make_facts()
EAGER = EagerAttention(FACTS)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (batch, heads, kv_heads, q_len, kv_len, head_dim, causal)
SHAPES = [
    pytest.param(1, 4, 2, 1, 11, 16, True, id="gqa-decode"),
    pytest.param(1, 4, 2, 5, 11, 16, True, id="gqa-q<kv-causal"),
    pytest.param(2, 4, 2, 9, 9, 16, True, id="gqa-prefill"),
    pytest.param(1, 4, 4, 7, 7, 8, False, id="mha-bidirectional"),
    pytest.param(1, 6, 2, 4, 10, 8, False, id="gqa3-q<kv-bidirectional"),
]


def inputs(b, h, kvh, q_len, kv_len, d, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n_heads, n, d, generator=gen).to(device, dtype)
                 for n_heads, n in ((h, q_len), (kvh, kv_len), (kvh, kv_len)))


# --- chunked ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 2, 4, 1024])
@pytest.mark.parametrize(("b", "h", "kvh", "q_len", "kv_len", "d", "causal"), SHAPES)
def test_chunked_matches_eager_fp32(b, h, kvh, q_len, kv_len, d, causal, chunk):
    q, k, v = inputs(b, h, kvh, q_len, kv_len, d)
    got = ChunkedAttention(FACTS, ChunkedOptions(chunk_size=chunk)).attend(q, k, v, causal=causal, scale=d ** -0.5)
    want = EAGER.attend(q, k, v, causal=causal, scale=d ** -0.5)
    assert got.shape == want.shape == (b, q_len, h, d)
    assert relative_error(got, want) <= 1e-6          # measured: ≤ 2e-7 (summation order only)


@pytest.mark.parametrize(("b", "h", "kvh", "q_len", "kv_len", "d", "causal"), SHAPES)
def test_chunked_matches_eager_bf16(b, h, kvh, q_len, kv_len, d, causal):
    q, k, v = inputs(b, h, kvh, q_len, kv_len, d, torch.bfloat16)
    got = ChunkedAttention(FACTS, ChunkedOptions(chunk_size=2)).attend(q, k, v, causal=causal, scale=d ** -0.5)
    want = EAGER.attend(q, k, v, causal=causal, scale=d ** -0.5)
    assert got.dtype == torch.bfloat16
    assert relative_error(got, want) <= 1e-2          # measured 0 here; bf16 rounding may differ by order


def test_chunked_varlen_matches_eager():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(4, 13, 8, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 5, 5, 13])                                   # includes an empty segment
    got = ChunkedAttention(FACTS, ChunkedOptions(chunk_size=3)).attend_varlen(q, k, v, cu, scale=0.3)
    want = EAGER.attend_varlen(q, k, v, cu, scale=0.3)
    assert got.shape == (13, 4, 8)
    assert relative_error(got, want) <= 1e-6


@pytest.mark.parametrize("causal", [True, False])
def test_chunked_score_matrix_never_exceeds_chunk_by_kv(monkeypatch, causal):
    seen: list[torch.Size] = []
    real_softmax = torch.softmax

    def recording_softmax(x, *args, **kwargs):
        seen.append(x.shape)
        return real_softmax(x, *args, **kwargs)

    monkeypatch.setattr(torch, "softmax", recording_softmax)
    b, h, kvh, q_len, kv_len, chunk = 1, 4, 2, 10, 14, 3
    ChunkedAttention(FACTS, ChunkedOptions(chunk_size=chunk)).attend(*inputs(b, h, kvh, q_len, kv_len, 8),
                                                                     causal=causal, scale=0.35)
    assert len(seen) == 4                                              # ceil(10 / 3) chunks
    assert all(s.numel() <= b * h * chunk * kv_len for s in seen)
    assert max(s.numel() for s in seen) < b * h * q_len * kv_len      # never the full matrix


@pytest.mark.parametrize("bad", [0, -5, 2.5, "big", True])
def test_chunked_rejects_bad_chunk_size(bad):
    with pytest.raises(ConfigError, match=r"attention\.options\.chunked.*chunk_size"):
        build_options(ChunkedAttention.Options, {"chunk_size": bad}, "attention.options.chunked")


@pytest.mark.parametrize("bad", [0, -5])
def test_chunked_options_reject_a_non_positive_chunk_when_built_directly(bad):
    with pytest.raises(ValueError, match=f"chunk_size must be a positive row count, got {bad}"):
        ChunkedAttention.Options(chunk_size=bad)


def test_chunked_options_default_and_from_config():
    assert ChunkedAttention.Options is ChunkedOptions
    assert ChunkedAttention(FACTS).options == ChunkedOptions(chunk_size=1024)
    built = build_options(ChunkedAttention.Options, {"chunk_size": 7}, "attention.options.chunked")
    plugin = ChunkedAttention(FACTS, built, name="chunked")
    assert plugin.options.chunk_size == 7 and plugin.name == "chunked" and plugin.hw is FACTS.hardware


def test_chunked_validates_everywhere_and_self_tests():
    for gpu in (None, PASCAL, PASCAL_NO_KERNELS, AMPERE):
        for dtype in ("float32", "bfloat16"):
            assert ChunkedAttention.validate(make_facts(gpu=gpu, stored_dtype=dtype), ChunkedOptions()) == []
    ChunkedAttention(FACTS).self_test(EAGER)


class PerturbedChunked(ChunkedAttention):
    def attend(self, q, k, v, *, causal, scale):
        return super().attend(q, k, v, causal=causal, scale=scale) * (1 + 1e-4)


class LastChunkDropped(ChunkedAttention):
    """A plausible bug: the final partial chunk is never computed."""

    def attend(self, q, k, v, *, causal, scale):
        out = super().attend(q, k, v, causal=causal, scale=scale)
        tail = q.shape[2] % self.options.chunk_size
        if tail:
            out[:, -tail:] = 0
        return out


@pytest.mark.parametrize("faulty", [PerturbedChunked, LastChunkDropped])
def test_faulty_chunked_fails_self_test(faulty):
    with pytest.raises(SelfTestError, match="relative error"):
        faulty(FACTS).self_test(EAGER)


# --- forced SDPA: mask logic checked on CPU through the math backend -------------------------------------------

@pytest.mark.parametrize(("b", "h", "kvh", "q_len", "kv_len", "d", "causal"), SHAPES)
def test_forced_sdpa_mask_forms_match_eager(b, h, kvh, q_len, kv_len, d, causal):
    q, k, v = inputs(b, h, kvh, q_len, kv_len, d)
    got = forced_sdpa(q, k, v, causal=causal, scale=d ** -0.5, backend=SDPBackend.MATH)
    want = EAGER.attend(q, k, v, causal=causal, scale=d ** -0.5)
    assert relative_error(got, want) <= 1e-6


# --- validate ----------------------------------------------------------------------------------------------------

MAXWELL_OLD = GpuFacts(name="GTX 780", compute_capability=(3, 5), vram_gb=3.0, torch_has_kernels=True)


def test_mem_efficient_validate():
    opts = NoOptions()
    assert SdpaMemEfficientAttention.validate(make_facts(), opts) == ["needs a CUDA GPU; this machine has none"]
    no_kernels = SdpaMemEfficientAttention.validate(make_facts(gpu=PASCAL_NO_KERNELS), opts)
    assert len(no_kernels) == 1 and "sm_61" in no_kernels[0] and "has none" in no_kernels[0]
    assert SdpaMemEfficientAttention.validate(make_facts(gpu=PASCAL), opts) == []
    for dtype in ("float32", "float16", "bfloat16"):          # fp32 weights are fine for this kernel
        assert SdpaMemEfficientAttention.validate(make_facts(gpu=AMPERE, stored_dtype=dtype), opts) == []
    assert SdpaMemEfficientAttention.validate(make_facts(gpu=MAXWELL_OLD), opts) == [
        "needs compute capability ≥ 5.0 (memory-efficient SDPA); GPU is sm_35"]


FP32_REASON = "FlashAttention runs only in fp16/bf16; the weights are float32"


def test_flash_validate():
    opts = NoOptions()
    assert SdpaFlashAttention.validate(make_facts(stored_dtype="bfloat16"), opts) == [
        "needs a CUDA GPU; this machine has none"]
    assert SdpaFlashAttention.validate(make_facts(stored_dtype="float32"), opts) == [
        "needs a CUDA GPU; this machine has none", FP32_REASON]
    assert SdpaFlashAttention.validate(make_facts(gpu=PASCAL, stored_dtype="float16"), opts) == [
        "needs compute capability ≥ 8.0 (FlashAttention); GPU is sm_61"]
    both = SdpaFlashAttention.validate(make_facts(gpu=PASCAL_NO_KERNELS, stored_dtype="float32"), opts)
    assert len(both) == 3 and "has none" in both[0] and "sm_61" in both[0]
    assert both[1].startswith("needs compute capability ≥ 8.0") and both[2] == FP32_REASON
    for dtype in ("bfloat16", "float16"):
        assert SdpaFlashAttention.validate(make_facts(gpu=AMPERE, stored_dtype=dtype), opts) == []
    assert SdpaFlashAttention.validate(make_facts(gpu=AMPERE, stored_dtype="float32"), opts) == [FP32_REASON]


def test_flash_validate_reads_the_stored_dtype_of_the_facts_model():
    """The reason comes from the model that will be loaded (RunFacts), whatever hardware profile is given."""
    from qvl_pipeline.facts import RunFacts
    from tests.conftest import make_profile

    hw = make_profile(gpu=AMPERE)
    assert SdpaFlashAttention.validate(RunFacts.example(hw, stored_dtype="float32"), NoOptions()) == [FP32_REASON]
    assert SdpaFlashAttention.validate(RunFacts.example(hw, stored_dtype="bfloat16"), NoOptions()) == []


def test_flash_refuses_fp32_activations_with_a_reason():
    with pytest.raises(RuntimeError, match=r"fp16/bf16; got torch\.float32"):
        SdpaFlashAttention(make_facts(gpu=AMPERE)).attend(*inputs(1, 2, 2, 3, 3, 8), causal=True, scale=0.3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA failure path")
@pytest.mark.parametrize("cls", [SdpaMemEfficientAttention, SdpaFlashAttention])
def test_cuda_self_tests_fail_cleanly_without_cuda(cls):
    with pytest.raises(SelfTestError, match="cannot reach a CUDA device"):
        cls(make_facts(gpu=AMPERE)).self_test(EAGER)


# --- CUDA ----------------------------------------------------------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(("b", "h", "kvh", "q_len", "kv_len", "d", "causal"), SHAPES)
def test_mem_efficient_matches_eager_on_cuda(b, h, kvh, q_len, kv_len, d, causal, dtype):
    q, k, v = inputs(b, h, kvh, q_len, kv_len, d, dtype, "cuda")
    got = SdpaMemEfficientAttention(FACTS).attend(q, k, v, causal=causal, scale=d ** -0.5)
    want = EAGER.attend(q.float(), k.float(), v.float(), causal=causal, scale=d ** -0.5)
    assert relative_error(got, want) <= (1e-5 if dtype == torch.float32 else 4e-3)


@needs_cuda
def test_mem_efficient_self_test_on_cuda():
    SdpaMemEfficientAttention(FACTS).self_test(EAGER)


def _sm() -> tuple[int, int]:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)


@needs_cuda
@pytest.mark.skipif(_sm() < (8, 0), reason="needs CUDA sm_80+ (FlashAttention)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("b", "h", "kvh", "q_len", "kv_len", "d", "causal"), SHAPES)
def test_flash_matches_eager_on_cuda(b, h, kvh, q_len, kv_len, d, causal, dtype):
    q, k, v = inputs(b, h, kvh, q_len, kv_len, d, dtype, "cuda")
    got = SdpaFlashAttention(FACTS).attend(q, k, v, causal=causal, scale=d ** -0.5)
    want = EAGER.attend(q.float(), k.float(), v.float(), causal=causal, scale=d ** -0.5)
    assert relative_error(got, want) <= 4 * torch.finfo(dtype).eps


@needs_cuda
@pytest.mark.skipif(_sm() < (8, 0), reason="needs CUDA sm_80+ (FlashAttention)")
def test_flash_self_test_on_cuda():
    SdpaFlashAttention(FACTS).self_test(EAGER)


def test_cuda_attention_plugins_compute_cpu_layers_of_a_split_placement():
    """cuda_partial keeps trailing layers on the CPU; the CUDA-only plugins must still compute them exactly."""
    facts = make_facts(gpu=PASCAL)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, n, 16, generator=g) for h, n in ((4, 3), (2, 7), (2, 7)))
    want = EagerAttention(facts).attend(q, k, v, causal=True, scale=0.25)
    got = SdpaMemEfficientAttention(facts).attend(q, k, v, causal=True, scale=0.25)
    assert torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_eager_head_by_head_gives_the_same_bits_as_all_heads_at_once(monkeypatch, dtype, causal):
    from qvl_plugins.attention import eager

    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 6, 9, 16, generator=gen).to(dtype)
    k, v = (torch.randn(2, 3, 13, 16, generator=gen).to(dtype) for _ in range(2))         # GQA, kv longer
    plugin = EagerAttention(FACTS)
    monkeypatch.setattr(eager, "SCORE_CHUNK_BYTES", 1 << 30)
    whole = plugin.attend(q, k, v, causal=causal, scale=0.25)
    for budget in (1, 2 * 9 * 13 * 4 * 4):                    # one head at a time; four (a last chunk of two)
        monkeypatch.setattr(eager, "SCORE_CHUNK_BYTES", budget)
        got = plugin.attend(q, k, v, causal=causal, scale=0.25)
        assert got.is_contiguous() and torch.equal(got, whole)
