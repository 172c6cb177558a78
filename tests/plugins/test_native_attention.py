"""The native decode attention (one query position in one C call), the native bf16 prefill attention (vision tower
and decoder) and the int8 KV cache's native read-back: parity with eager attention and with torch's read-back, the
fallbacks, the self-test catching a faulty kernel."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.slots.base import NoOptions, SelfTestError
from qvl_pipeline.slots.kv_cache import CacheShape, KVCache
from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.attention import native as native_attention
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.attention.native import NativeAttention
from qvl_plugins.attention.sdpa import SdpaAttention
from qvl_plugins.kernels import native_gemv
from qvl_plugins.kv_cache.int8 import Int8KVCache, Int8KVCacheStore, read_back
from tests.conftest import cpu_flags, make_facts

FACTS = make_facts()
EAGER = EagerAttention(FACTS)


@pytest.fixture(scope="module")
def plugin() -> NativeAttention:
    reasons = NativeAttention.validate(FACTS, NoOptions())
    if reasons:
        pytest.skip(f"the native library does not build here: {reasons}")
    return NativeAttention(FACTS)


@pytest.fixture
def build() -> native_gemv.NativeBuild:
    """The native library for FACTS (the test skips where it does not build)."""
    b = native_gemv.native_for(FACTS)
    if not b.available:
        pytest.skip(b.reason)
    return b


def cache_views(b, kvh, n, d, dtype, gen, max_len=40):
    """k, v [b, kvh, n, d] as views of a preallocated [b, kvh, max_len, d] cache (strided like the real one)."""
    k = torch.randn(b, kvh, max_len, d, generator=gen).to(dtype)
    v = torch.randn(b, kvh, max_len, d, generator=gen).to(dtype)
    return k[:, :, :n], v[:, :, :n]


@pytest.mark.parametrize(("b", "h", "kvh", "n", "d"), [(1, 4, 2, 11, 16), (2, 6, 2, 33, 24), (1, 16, 8, 37, 128),
                                                       (1, 2, 2, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_matches_eager(plugin, b, h, kvh, n, d, dtype):
    gen = torch.Generator().manual_seed(0)
    k, v = cache_views(b, kvh, n, d, dtype, gen)
    q = torch.randn(b, h, 1, d, generator=gen).to(dtype)
    got = plugin.attend(q, k, v, causal=True, scale=d ** -0.5)
    want = EAGER.attend(q.float(), k.float(), v.float(), causal=True, scale=d ** -0.5)
    assert got.shape == (b, 1, h, d) and got.dtype == dtype
    # fp32: summation order only (measured ≤ 2e-6); bf16: the result's one rounding (2^-9 relative)
    assert relative_error(got.float(), want) <= (1e-5 if dtype == torch.float32 else 8e-3)


def test_other_calls_are_torch_sdpa(plugin):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, heads, n, 16, generator=gen) for heads, n in ((4, 5), (2, 9), (2, 9)))
    assert torch.equal(plugin.attend(q, k, v, causal=True, scale=0.25),
                       SdpaAttention(FACTS).attend(q, k, v, causal=True, scale=0.25))      # prefill
    q1 = q[:, :, :1].half()
    assert torch.equal(plugin.attend(q1, k.half(), v.half(), causal=True, scale=0.25),
                       SdpaAttention(FACTS).attend(q1, k.half(), v.half(), causal=True, scale=0.25))  # fp16


def test_self_test_passes_and_catches_a_faulty_kernel(plugin, monkeypatch):
    plugin.self_test(EAGER)
    real = native_attention.decode_attention

    def unscaled(build, q, k, v, scale):                 # a plausible bug: the softmax scale dropped
        return real(build, q, k, v, 1.0)

    monkeypatch.setattr(native_attention, "decode_attention", unscaled)
    with pytest.raises(SelfTestError, match="q_len=1"):
        plugin.self_test(EAGER)


def test_without_the_native_library_the_chain_moves_on(monkeypatch):
    monkeypatch.setenv(native_gemv.DISABLE_ENV, "0")
    native_gemv.load_native.cache_clear()
    try:
        reasons = NativeAttention.validate(FACTS, NoOptions())
        assert reasons and "disabled" in reasons[0]
    finally:
        native_gemv.load_native.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cache_native_read_back_is_bit_equal_to_torch(build, dtype):
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(-127, 128, (2, 3, 50, 24), generator=gen, dtype=torch.int8)[:, :, :37]    # cache views
    scale = (torch.rand(2, 3, 50, 1, generator=gen) * 0.05)[:, :, :37]
    got = read_back(q, scale, dtype, build)
    assert got.is_contiguous() and torch.equal(got, (q * scale).to(dtype))
    shape = CacheShape(layers=1, batch=1, kv_heads=2, head_dim=16, max_len=12)
    fast, plain = Int8KVCacheStore(shape, dtype, ["cpu"], build), Int8KVCacheStore(shape, dtype, ["cpu"])
    for n in (5, 1, 1):
        k, v = torch.randn(1, 2, n, 16, generator=gen).to(dtype), torch.randn(1, 2, n, 16, generator=gen).to(dtype)
        for got, want in zip(fast.append(0, k, v), plain.append(0, k, v), strict=True):
            assert torch.equal(got, want)
        fast.advance(n)
        plain.advance(n)
    assert Int8KVCache(FACTS).create(shape, dtype, ["cpu"]).native is build


@pytest.mark.parametrize(("b", "h", "kvh", "n", "d"), [(1, 4, 2, 11, 16), (2, 6, 2, 33, 24), (1, 16, 8, 37, 128),
                                                       (1, 2, 2, 1, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_over_int8_rows_is_bit_equal_to_widening_them_first(plugin, b, h, kvh, n, d, dtype):
    gen = torch.Generator().manual_seed(3)
    shape = CacheShape(layers=1, batch=b, kv_heads=kvh, head_dim=d, max_len=n + 5)          # strided cache views
    cache = Int8KVCache(FACTS).create(shape, dtype, ["cpu"])
    rows = cache.append_int8(0, torch.randn(b, kvh, n, d, generator=gen).to(dtype),
                             torch.randn(b, kvh, n, d, generator=gen).to(dtype))
    q = torch.randn(b, h, 1, d, generator=gen).to(dtype)
    got = plugin.attend_int8(q, *rows, causal=True, scale=d ** -0.5)
    want = plugin.attend(q, rows[0].dequantize(), rows[1].dequantize(), causal=True, scale=d ** -0.5)
    assert got.shape == (b, 1, h, d) and torch.equal(got, want)
    several = torch.randn(b, h, 2, d, generator=gen).to(dtype)                    # not a decode step: widened rows
    assert torch.equal(plugin.attend_int8(several, *rows, causal=True, scale=0.5),
                       plugin.attend(several, rows[0].dequantize(), rows[1].dequantize(), causal=True, scale=0.5))


def test_an_attention_plugin_without_its_own_int8_path_reads_the_widened_rows():
    gen = torch.Generator().manual_seed(4)
    shape = CacheShape(layers=1, batch=1, kv_heads=2, head_dim=16, max_len=9)
    rows = Int8KVCacheStore(shape, torch.float32, ["cpu"]).append_int8(0, torch.randn(1, 2, 7, 16, generator=gen),
                                                                        torch.randn(1, 2, 7, 16, generator=gen))
    q = torch.randn(1, 4, 1, 16, generator=gen)
    got = EAGER.attend_int8(q, *rows, causal=True, scale=0.25)
    assert torch.equal(got, EAGER.attend(q, rows[0].dequantize(), rows[1].dequantize(), causal=True, scale=0.25))


def test_a_decoder_layer_hands_an_int8_caches_rows_to_attend_int8(plugin, monkeypatch):
    from qvl_pipeline.model.text import TextAttention
    from qvl_plugins.kernels.torch_native import TorchNativeKernels
    from qvl_plugins.rotary.reference import ReferenceRotary

    cfg = FACTS.model.config.text
    calls = []
    original = NativeAttention.attend_int8

    def spy(self, *args, **kwargs):
        calls.append(args[1].q.dtype)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NativeAttention, "attend_int8", spy)
    torch.manual_seed(0)
    layer = TextAttention(cfg, 0, plugin, ReferenceRotary(FACTS), TorchNativeKernels(FACTS))
    shape = CacheShape(layers=1, batch=1, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, max_len=8)
    x = torch.randn(1, 1, cfg.hidden_size)
    cos, sin = torch.ones(1, 1, 1, cfg.head_dim), torch.zeros(1, 1, 1, cfg.head_dim)

    class Widened(KVCache):                                   # the same int8 cache, seen without its int8 rows
        def __init__(self, inner: KVCache) -> None:
            self.inner = inner

        def append(self, layer_index, k, v):
            return self.inner.append(layer_index, k, v)

    with torch.no_grad():
        int8_out = layer(x, cos, sin, Int8KVCache(FACTS).create(shape, torch.float32, ["cpu"]))
        assert calls == [torch.int8]
        widened_out = layer(x, cos, sin, Widened(Int8KVCache(FACTS).create(shape, torch.float32, ["cpu"])))
    assert torch.equal(int8_out, widened_out) and calls == [torch.int8]


# --- the prefill's bf16 attention (AVX512-BF16): vision tower and decoder ----------------------------------------

def _bf16_facts():
    isa = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16")
    if not set(isa) <= cpu_flags():
        pytest.skip("this CPU lacks AVX512-BF16")
    facts = make_facts(isa=isa)
    if NativeAttention.validate(facts, NoOptions()):
        pytest.skip("the native library does not build here")
    return facts


@pytest.mark.parametrize(("heads", "bounds", "d"), [(2, [0, 1], 16), (3, [0, 7], 64), (2, [0, 37], 72),
                                                    (16, [0, 100], 64), (4, [0, 3, 40, 90], 128)])
def test_vision_attention_in_bf16_matches_eager(heads, bounds, d):
    plugin = NativeAttention(_bf16_facts())
    assert plugin._prefill
    gen = torch.Generator().manual_seed(3)
    n = bounds[-1]
    qkv = (torch.randn(n, 3, heads, d, generator=gen) * 2).to(torch.bfloat16)     # fused projection, as the tower
    q, k, v = (t.transpose(0, 1) for t in qkv.unbind(1))                          # [heads, n, d] strided views
    cu = torch.tensor(bounds)
    got = plugin.attend_varlen(q, k, v, cu, scale=d ** -0.5)
    want = EAGER.attend_varlen(q.float(), k.float(), v.float(), cu, scale=d ** -0.5)
    torch_bf16 = SdpaAttention(FACTS).attend_varlen(q, k, v, cu, scale=d ** -0.5)
    assert got.shape == (n, heads, d) and got.dtype == torch.bfloat16
    # p rounded to bf16 for p · v and the result's one rounding, as torch's own bf16 kernel (measured alike)
    assert relative_error(got.float(), want) <= 1e-2
    assert relative_error(torch_bf16.float(), want) <= 1e-2


def test_vision_attention_elsewhere_is_torch_sdpa(monkeypatch):
    facts = _bf16_facts()
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 9, 16, generator=gen) for _ in range(3))
    cu = torch.tensor([0, 4, 9])
    assert torch.equal(NativeAttention(facts).attend_varlen(q, k, v, cu, scale=0.25),
                       SdpaAttention(facts).attend_varlen(q, k, v, cu, scale=0.25))            # fp32
    no_bf16 = make_facts(isa=("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl"))
    assert not NativeAttention(no_bf16)._prefill                                              # the CPU lacks it
    odd = torch.randn(2, 9, 15, generator=gen).to(torch.bfloat16)
    assert torch.equal(NativeAttention(facts).attend_varlen(odd, odd, odd, cu, scale=0.25),
                       SdpaAttention(facts).attend_varlen(odd, odd, odd, cu, scale=0.25))       # odd head_dim


@pytest.mark.parametrize(("b", "h", "kvh", "q_len", "kv_len", "d", "causal"), [
    (1, 16, 8, 37, 37, 128, True),       # the 2B decoder's heads; a partial block of queries and of keys
    (1, 4, 2, 5, 70, 16, True),          # a prefill after 65 cached positions
    (2, 6, 2, 33, 33, 24, True),         # batch 2, three q heads a kv head
    (1, 2, 2, 7, 7, 16, False),          # not causal: every key
    (1, 2, 1, 2, 2, 8, True),
])
def test_decoder_prefill_in_bf16_matches_eager(monkeypatch, b, h, kvh, q_len, kv_len, d, causal):
    """A bf16 prefill over the cache's rows takes the native prefill attention (grouped kv heads, the queries the
    last q_len of kv_len positions) and matches eager attention as torch's own bf16 SDPA does."""
    plugin = NativeAttention(_bf16_facts())
    calls = []
    real = native_attention.prefill_attention
    monkeypatch.setattr(native_attention, "prefill_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(6)
    k, v = cache_views(b, kvh, kv_len, d, torch.bfloat16, gen, max_len=kv_len + 9)
    q = (torch.randn(b, h, q_len, d, generator=gen) * 2).to(torch.bfloat16)
    got = plugin.attend(q, k, v, causal=causal, scale=d ** -0.5)
    want = EAGER.attend(q.float(), k.float(), v.float(), causal=causal, scale=d ** -0.5)
    torch_bf16 = SdpaAttention(FACTS).attend(q, k, v, causal=causal, scale=d ** -0.5)
    assert len(calls) == b and got.shape == (b, q_len, h, d) and got.dtype == torch.bfloat16
    assert relative_error(got.float(), want) <= 1e-2 and relative_error(torch_bf16.float(), want) <= 1e-2
    if causal and q_len > 1:              # the first query sees only its own prefix: a future key changes nothing
        k2 = k.clone()
        k2[:, :, kv_len - 1] += 5
        again = plugin.attend(q, k2, v, causal=True, scale=d ** -0.5)
        assert torch.equal(again[:, :-1], got[:, :-1]) and not torch.equal(again[:, -1], got[:, -1])


def _faulty(scale_dropped_when: bool):
    real = native_attention.prefill_attention

    def fault(build, q, k, v, scale, causal=False, **out):       # the softmax scale dropped, causal or not
        return real(build, q, k, v, 1.0 if causal == scale_dropped_when else scale, causal, **out)
    return fault


@pytest.mark.parametrize(("fault", "message"), [
    (_faulty(True), r"attend\(q_len=3, kv_len=9, heads=4/2, causal=True\)"),                   # the decoder's
    (_faulty(False), r"attend\(q_len=5, kv_len=5, heads=2/2, causal=False\)"),
    (lambda build, q, k, v, scale, causal=False, real=native_attention.prefill_attention, **out:
     real(build, q, k, v, scale, False, **out), r"attend\(q_len=3, kv_len=9, heads=4/2, causal=True\)"),  # causal lost
])
def test_the_self_test_covers_the_native_prefill_paths(monkeypatch, fault, message):
    plugin = NativeAttention(_bf16_facts())
    plugin.self_test(EAGER)
    monkeypatch.setattr(native_attention, "prefill_attention", fault)
    with pytest.raises(SelfTestError, match=message):
        plugin.self_test(EAGER)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_cache_native_quantisation_is_bit_equal_to_torch(build, dtype):
    from qvl_plugins.kv_cache.int8 import quantize_rows, store_rows

    gen = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, 5, 24, generator=gen) * 3).to(dtype)
    x[0, 1, 2] = 0                                                   # an all-zero row: the smallest scale
    x[1, 0, 0, :2] = torch.tensor([127.0, 0.5]).to(dtype)           # 0.5 / (127 / 127): a tie, rounded to even
    q = torch.zeros(2, 3, 9, 24, dtype=torch.int8)                  # cache buffers; slots 2..6 are written
    scale = torch.zeros(2, 3, 9, 1)
    store_rows(x.transpose(2, 3).contiguous().transpose(2, 3), q[:, :, 2:7], scale[:, :, 2:7], build)
    want_q, want_scale = quantize_rows(x)
    assert torch.equal(q[:, :, 2:7], want_q) and torch.equal(scale[:, :, 2:7], want_scale)
    assert not q[:, :, :2].any() and not q[:, :, 7:].any() and not scale[:, :, 7:].any()   # nothing else written
