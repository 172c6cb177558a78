"""Kernels plugins: dtypes, prepare, parity with TorchNativeKernels.linear, int8 error and kernels, streamed
quantisation, the int8 head (tied and untied), validate, faults."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qvl_pipeline.slots.base import SelfTestError
from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.kernels.fp16_store import Fp16StoreFp32ComputeKernels, Fp16StoreLinear
from qvl_plugins.kernels.fp32_compute import Fp32ComputeKernels
from qvl_plugins.kernels.int8_linear import Int8Linear
from qvl_plugins.kernels.int8_weight_only import Int8Options, Int8WeightOnlyKernels, QuantizableLinear
from qvl_plugins.kernels.quantize import is_file_backed, quantize_int8_rows, release_pages
from qvl_plugins.kernels.torch_native import TorchNativeKernels
from tests.conftest import AMPERE, PASCAL, make_facts

FACTS = make_facts()                                      # avx2 + fma, no GPU
NATIVE = TorchNativeKernels(FACTS)

# Qwen3-VL-2B sizes (shared/QWEN3VL_NOTES.md): about 2.1 G parameters, 7.9 GiB in fp32.
HF_2B = {
    "tie_word_embeddings": True,
    "text_config": {"hidden_size": 2048, "intermediate_size": 6144, "vocab_size": 151936, "num_hidden_layers": 28,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "out_hidden_size": 2048, "depth": 24,
                      "deepstack_visual_indexes": [5, 11, 17]},
}


def random_reference(in_f: int, out_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    ref = NATIVE.linear(in_f, out_f, bias)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return ref


class RMSNorm(nn.Module):
    """Stands in for the model's own norm class: matched by name."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))


class TinyModel(nn.Module):
    """Names as in the decoder: layers.N.{q_proj, norm}, an embed_tokens embedding, lm_head (None when tied, as in
    Qwen3VL); an int buffer."""

    def __init__(self, kernels, d: int = 32, vocab: int = 40, tied: bool = False) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(nn.ModuleDict({"q_proj": kernels.linear(d, d, False), "norm": RMSNorm(d),
                                                   "ln": nn.LayerNorm(d)}) for _ in range(2))
        self.lm_head = None if tied else kernels.linear(d, vocab, False)
        self.register_buffer("positions", torch.arange(4))


# --- fp32 compute ------------------------------------------------------------------------------------------------

def test_fp32_compute_dtype_and_prepare():
    kernels = Fp32ComputeKernels(FACTS)
    for stored in (torch.bfloat16, torch.float16, torch.float32):
        assert kernels.compute_dtype(stored) == torch.float32
    model = kernels.prepare(TinyModel(kernels).to(torch.bfloat16))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert model.positions.dtype == torch.int64


def test_fp32_compute_is_exact_on_the_upcast_weights():
    ref = random_reference(48, 40)
    stored = {n: t.bfloat16() for n, t in ref.state_dict().items()}
    kernels = Fp32ComputeKernels(FACTS)
    mine = kernels.linear(48, 40, True).to(torch.bfloat16)
    mine.load_state_dict(stored)
    mine = kernels.prepare(mine)
    ref.load_state_dict({n: t.float() for n, t in stored.items()})
    x = torch.randn(5, 48)
    assert relative_error(mine(x), ref(x)) == 0.0          # measured: 0 (same fp32 GEMM)


def test_fp32_validate_checks_ram_with_numbers():
    assert Fp32ComputeKernels.validate(make_facts(hf_config=HF_2B, ram_gb=16.0), None) == []
    (reason,) = Fp32ComputeKernels.validate(make_facts(hf_config=HF_2B, ram_gb=8.0), None)
    assert reason.startswith("fp32 weights need 7.9 GiB but 85% of this machine's 8.0 GiB RAM is 6.8 GiB")
    assert Fp32ComputeKernels.validate(make_facts(ram_gb=8.0), None) == []        # the tiny model fits anywhere


# --- fp16 storage, fp32 compute ------------------------------------------------------------------------------

def test_fp16_store_linear_keeps_checkpoint_names_and_computes_fp32():
    kernels = Fp16StoreFp32ComputeKernels(make_facts(gpu=PASCAL))
    layer = kernels.linear(16, 8, True)
    assert isinstance(layer, nn.Linear) and set(layer.state_dict()) == {"weight", "bias"}
    assert layer.weight.dtype == torch.float16
    assert kernels.compute_dtype(torch.bfloat16) == torch.float32
    for x_dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert layer(torch.randn(2, 16).to(x_dtype)).dtype == torch.float32


def test_fp16_store_prepare_casts_linears_to_fp16_and_norms_to_fp32():
    kernels = Fp16StoreFp32ComputeKernels(FACTS)
    model = kernels.prepare(TinyModel(kernels).to(torch.bfloat16))
    layer = model.layers[0]
    assert layer["q_proj"].weight.dtype == torch.float16 and model.lm_head.weight.dtype == torch.float16
    assert layer["norm"].weight.dtype == torch.float32 and layer["ln"].weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16        # not a linear, not a norm: untouched


def test_fp16_store_error_vs_fp32_reference():
    ref = random_reference(256, 128)
    kernels = Fp16StoreFp32ComputeKernels(FACTS)
    mine = kernels.linear(256, 128, True)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(4, 256)
    err = relative_error(kernels.prepare(mine)(x), ref(x))
    assert 0 < err < 1e-3                                           # measured 2.1e-4 (fp16 weight rounding)


def test_fp16_store_validates_everywhere():
    for gpu in (None, PASCAL, AMPERE):
        assert Fp16StoreFp32ComputeKernels.validate(make_facts(gpu=gpu), None) == []


# --- int8 weight-only: quantisation ------------------------------------------------------------------------------

def whole_tensor_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook per-channel quantisation, on the whole tensor at once."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block", [64, 7 * 48, 1 << 20])          # one row, uneven blocks, one block
def test_streamed_int8_quantisation_equals_whole_tensor(dtype, block):
    weight = torch.randn(37, 48, generator=torch.Generator().manual_seed(1)).to(dtype)
    weight[5] = 0                                                   # an all-zero row keeps a finite scale
    q, scale = quantize_int8_rows(weight, block_elements=block)
    want_q, want_scale = whole_tensor_int8(weight)
    assert torch.equal(q, want_q) and torch.equal(scale, want_scale)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.isfinite().all()


def test_release_pages_skips_torch_memory_and_keeps_mapped_data(tmp_path):
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import save_file

    own = torch.randn(4096, 8)
    assert not is_file_backed(own) and release_pages(own) is False   # torch's own allocation: left alone
    external = torch.from_numpy(np.ones((1024, 1024), dtype=np.float32))
    assert not is_file_backed(external) and release_pages(external)  # paged out (kept or swapped), never zeroed
    assert external.sum().item() == 1024 * 1024
    save_file({"w": (torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))).bfloat16()},
              str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        mapped = f.get_tensor("w")
        assert is_file_backed(mapped)
        before = mapped.float().sum().item()
        q, _ = quantize_int8_rows(mapped, release_source=True, block_elements=1 << 16)
        assert mapped.float().sum().item() == before                # pages read back from the file, unchanged
        assert torch.equal(q, whole_tensor_int8(mapped)[0])


# --- int8 weight-only: the layer ---------------------------------------------------------------------------------

def quantized_pair(in_f: int, out_f: int, facts=FACTS, **options):
    ref = random_reference(in_f, out_f)
    kernels = Int8WeightOnlyKernels(facts, Int8Options(**options))
    mine = kernels.linear(in_f, out_f, True)
    assert isinstance(mine, QuantizableLinear) and set(mine.state_dict()) == {"weight", "bias"}
    mine.load_state_dict(ref.state_dict())
    return ref, kernels.prepare(mine)


@pytest.mark.parametrize("rows", [1, 3, 33, 80])                  # int8 GEMV up to pack_max_rows=32, then dequant
def test_int8_error_vs_fp32_below_one_percent(rows):
    ref, mine = quantized_pair(256, 384)
    assert isinstance(mine, Int8Linear) and "kernel=int8pack_mm" in mine.extra_repr()
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    err = relative_error(mine(x), ref(x))
    assert 1e-4 < err < 1e-2                                        # measured 6.4e-3 … 8e-3 on this seed


def test_int8_both_kernels_agree_and_keep_leading_dims():
    ref, mine = quantized_pair(64, 48)
    x = torch.randn(2, 3, 64)
    packed = mine(x)
    mine.pack_max_rows = 0                                          # force the dequant path
    dequant = mine(x)
    assert packed.shape == dequant.shape == (2, 3, 48)
    assert relative_error(packed, dequant) < 5e-3                   # bf16 rounding of activations/scales/outputs
    assert relative_error(dequant, ref(x)) < 1e-2


def test_int8_gemv_takes_bf16_activations_as_they_are_and_copies_views():
    _, mine = quantized_pair(64, 48)
    x = torch.randn(5, 64).bfloat16()
    whole = mine(x)
    assert whole.dtype == torch.bfloat16
    assert torch.equal(mine(x[2:3]), whole[2:3])                    # a view at an offset: copied, same result
    assert torch.equal(mine(x[:, None, :]).squeeze(1), whole)


def test_int8_blocked_dequant_equals_whole_dequant():
    _, mine = quantized_pair(64, 48, pack_max_rows=0)
    x = torch.randn(3, 64)
    whole = mine(x)
    mine._dequant_rows = 5                                          # uneven blocks: 9 × 5 rows + 3
    assert relative_error(mine(x), whole) <= 1e-6                   # GEMM order only


def test_int8_falls_back_to_dequant_when_the_gemv_cannot_run():
    _, odd = quantized_pair(33, 8)                                  # in_features % 16 != 0: the GEMV is unsafe
    assert "kernel=dequant" in odd.extra_repr()
    assert odd(torch.randn(1, 33)).isfinite().all()
    _, old_cpu = quantized_pair(64, 8, facts=make_facts(isa=("sse4_2",)))
    assert "kernel=dequant" in old_cpu.extra_repr()


def test_int8_misaligned_weight_is_copied_aligned():
    q, scale = quantize_int8_rows(torch.randn(16, 64))
    storage = torch.empty(16 * 64 + 3, dtype=torch.int8)
    shifted = storage[3:].view(16, 64)
    shifted.copy_(q)
    assert shifted.data_ptr() % 16
    layer = Int8Linear(shifted, scale, None, pack_cpu=True, pack_max_rows=32)
    assert layer.weight_int8.data_ptr() % 64 == 0 and torch.equal(layer.weight_int8, q)


def test_int8_bf16_compute_dtype_option():
    ref, mine = quantized_pair(64, 32, compute_dtype="bfloat16")
    kernels = Int8WeightOnlyKernels(FACTS, Int8Options(compute_dtype="stored"))
    assert kernels.compute_dtype(torch.float16) == torch.float16
    assert Int8WeightOnlyKernels(FACTS).compute_dtype(torch.bfloat16) == torch.float32
    x = torch.randn(4, 64)
    out = mine(x.bfloat16())
    assert out.dtype == torch.bfloat16 and relative_error(out, ref(x)) < 2e-2


def test_int8_gemv_row_limit_follows_the_compute_dtype():
    bf16 = {"stored_dtype": "bfloat16"}
    assert Int8WeightOnlyKernels(make_facts(isa=("avx2", "avx512f", "avx512_bf16"), **bf16)).pack_max_rows == 32
    assert Int8WeightOnlyKernels(make_facts(isa=("avx2", "amx_bf16"), **bf16)).pack_max_rows == 32
    assert Int8WeightOnlyKernels(make_facts(**bf16)).pack_max_rows == 64          # AVX2: auto computes in fp32
    stored = Int8WeightOnlyKernels(make_facts(**bf16), Int8Options(compute_dtype="stored"))
    assert stored.pack_max_rows > 10**9                                # AVX2, emulated bf16: the GEMV takes every row
    assert Int8WeightOnlyKernels(FACTS, Int8Options(pack_max_rows=7)).pack_max_rows == 7
    _, mine = quantized_pair(64, 48, facts=make_facts(isa=("avx2", "avx512_bf16")))
    mine(torch.randn(40, 64))                                               # past the limit: the dequant GEMM
    Int8WeightOnlyKernels(make_facts(isa=("avx2", "avx512_bf16"))).self_test(NATIVE)


def test_int8_bad_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="compute_dtype"):
        Int8Options(compute_dtype="int8")


# --- int8 weight-only: the model ---------------------------------------------------------------------------------

def test_int8_prepare_keeps_names_and_quantizes_the_head_by_default():
    kernels = Int8WeightOnlyKernels(FACTS)
    model = kernels.prepare(TinyModel(kernels))
    keys = set(model.state_dict())
    assert {"layers.0.q_proj.weight_int8", "layers.0.q_proj.weight_scale", "layers.1.q_proj.weight_int8",
            "lm_head.weight_int8"} <= keys
    assert isinstance(model.lm_head, Int8Linear) and model.layers[0]["q_proj"].weight_int8.dtype == torch.int8
    plain = Int8WeightOnlyKernels(FACTS, Int8Options(quantize_head=False))
    assert isinstance(plain.prepare(TinyModel(plain)).lm_head, QuantizableLinear)


def test_int8_tied_head_gets_its_own_int8_copy_and_the_embedding_stays_exact():
    kernels = Int8WeightOnlyKernels(FACTS)
    model = TinyModel(kernels, tied=True)
    table = model.embed_tokens.weight.detach().clone()
    model = kernels.prepare(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.embed_tokens.weight, table)            # lookups still read the exact table
    ids = torch.tensor([[3, 7, 39]])
    assert torch.equal(model.embed_tokens(ids), table[ids])
    hidden = torch.randn(3, 32)
    want = hidden @ table.T                                          # what the tied head computed before
    assert relative_error(model.lm_head(hidden), want) < 1e-2       # measured ~7e-3
    assert next(model.lm_head.parameters()).device.type == "cpu"    # the head's device can be asked as usual
    untouched = Int8WeightOnlyKernels(FACTS, Int8Options(quantize_head=False))
    assert untouched.prepare(TinyModel(untouched, tied=True)).lm_head is None


def test_int8_survives_dtype_casts_of_the_model():
    kernels = Int8WeightOnlyKernels(FACTS)
    model = kernels.prepare(TinyModel(kernels)).to(torch.float32)
    q_proj = model.layers[0]["q_proj"]
    assert q_proj.weight_int8.dtype == torch.int8 and "kernel=int8pack_mm" in q_proj.extra_repr()
    assert q_proj(torch.randn(1, 32)).shape == (1, 32)


def test_int8_prepare_without_a_checkpoint_writes_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    kernels = Int8WeightOnlyKernels(FACTS)                          # example facts: no checkpoint folder
    kernels.prepare(TinyModel(kernels))
    assert not (tmp_path / "cache").exists()


# --- self-tests and faults ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Fp32ComputeKernels, Fp16StoreFp32ComputeKernels, Int8WeightOnlyKernels])
def test_self_tests_pass(cls):
    cls(FACTS).self_test(NATIVE)


def test_int8_self_test_passes_without_simd():
    Int8WeightOnlyKernels(make_facts(isa=())).self_test(NATIVE)


class Fp32NoUpcast(Fp32ComputeKernels):
    """A plausible bug: prepare forgets to cast, so bf16 weights meet fp32 activations."""

    def prepare(self, model):
        return model


class Fp16DroppedBias(Fp16StoreFp32ComputeKernels):
    def linear(self, in_features, out_features, bias):
        layer = super().linear(in_features, out_features, bias)
        layer.forward = lambda x: torch.nn.functional.linear(x.float(), layer.weight.float())
        return layer


class Fp16NotStored(Fp16StoreFp32ComputeKernels):
    def linear(self, in_features, out_features, bias):
        return Fp16StoreLinear(in_features, out_features, bias=bias)

    def prepare(self, model):
        return model


class Int4Disguised(Int8WeightOnlyKernels):
    """A plausible bug: weights rounded to 4-bit levels."""

    def prepare(self, model):
        model = super().prepare(model)
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.weight_int8.data.copy_((m.weight_int8 // 16) * 16)
        return model


class Int8WrongScale(Int8WeightOnlyKernels):
    """A plausible bug: every scale 5% too small (e.g. the wrong maximum level)."""

    def prepare(self, model):
        model = super().prepare(model)
        for m in model.modules():
            if isinstance(m, Int8Linear):
                m.weight_scale.data.mul_(0.95)
                m._select_kernel()
        return model


@pytest.mark.parametrize(("faulty", "message"), [
    (Fp32NoUpcast, "failed: RuntimeError"),
    (Fp16DroppedBias, "relative error"),
    (Fp16NotStored, "not float16"),
    (Int4Disguised, "relative error"),
    (Int8WrongScale, "relative error"),
])
def test_faulty_kernels_fail_self_test(faulty, message):
    with pytest.raises(SelfTestError, match=message):
        faulty(FACTS).self_test(NATIVE)
