"""KV-cache plugins: the KVCache contract against StaticCache, growth, grow(), per-layer devices, overflow, int8
error, options, self-tests, faults."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.options import build_options
from qvl_pipeline.slots.base import NoOptions, SelfTestError
from qvl_pipeline.slots.kv_cache import CacheShape, ContextOverflowError
from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.kv_cache.dynamic import DynamicCache, DynamicOptions
from qvl_plugins.kv_cache.int8 import Int8KVCache
from qvl_plugins.kv_cache.static import StaticCache
from tests.conftest import AMPERE, make_facts

FACTS = make_facts()
SHAPE = CacheShape(layers=3, batch=2, kv_heads=2, head_dim=16, max_len=20)
CPU = tuple(torch.device("cpu") for _ in range(SHAPE.layers))      # one device per layer
STATIC = StaticCache(FACTS)
BACKENDS = [pytest.param(DynamicCache(FACTS, DynamicOptions(initial_len=2)), 0.0, id="dynamic"),
            pytest.param(Int8KVCache(FACTS), 2e-2, id="int8")]
ALL = [pytest.param(STATIC, 0.0, id="static"), *BACKENDS]


def kv(new: int, gen: torch.Generator, dtype=torch.float32):
    return tuple(torch.randn(SHAPE.batch, SHAPE.kv_heads, new, SHAPE.head_dim, generator=gen).to(dtype)
                 for _ in range(2))


def replay(backend, script, dtype=torch.float32):
    """Drive `backend` and StaticCache through (new, advance, truncate) steps; return the worst relative error
    of the returned keys/values and check shapes and lengths on the way."""
    gen = torch.Generator().manual_seed(0)
    mine, ref = backend.create(SHAPE, dtype, CPU), STATIC.create(SHAPE, dtype, CPU)
    worst = 0.0
    for new, advance, truncate in script:
        for layer in range(SHAPE.layers):
            k, v = kv(new, gen, dtype)
            got, want = mine.append(layer, k, v), ref.append(layer, k, v)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape == (SHAPE.batch, SHAPE.kv_heads, ref.length + new, SHAPE.head_dim)
                assert g.dtype == dtype
                worst = max(worst, relative_error(g, w))
        for cache in (mine, ref):
            if advance:
                cache.advance(new)
            if truncate is not None:
                cache.truncate(truncate)
        assert mine.length == ref.length
    return worst


# prefill 7, three decode steps, a retry that is appended but not committed, an edit back to 5, then more.
SCRIPT = [(7, True, None), (1, True, None), (1, True, None), (1, True, None), (2, False, None),
          (2, True, None), (3, False, 5), (4, True, None), (1, True, 30)]


@pytest.mark.parametrize(("backend", "tol"), BACKENDS)
def test_contract_matches_static_cache(backend, tol):
    err = replay(backend, SCRIPT)
    assert err <= tol                                     # measured: dynamic 0; int8 5.0e-3


def test_int8_cache_bf16_and_attention_error():
    assert replay(Int8KVCache(FACTS), SCRIPT, torch.bfloat16) < 2e-2
    gen = torch.Generator().manual_seed(5)
    caches = [b.create(SHAPE, torch.float32, CPU) for b in (Int8KVCache(FACTS), STATIC)]
    k, v = kv(12, gen)
    q = torch.randn(SHAPE.batch, 4, 3, SHAPE.head_dim, generator=gen)
    outs = [EagerAttention(FACTS).attend(q, *c.append(0, k, v), causal=True, scale=0.25) for c in caches]
    assert relative_error(*outs) < 1e-2                   # measured 6.3e-3 on the attention output


def test_dynamic_cache_grows_by_doubling_up_to_max_len():
    cache = DynamicCache(FACTS, DynamicOptions(initial_len=2)).create(SHAPE, torch.float32, CPU)
    per_position = 2 * SHAPE.layers * SHAPE.batch * SHAPE.kv_heads * SHAPE.head_dim * 4
    assert cache.nbytes() == 0
    gen = torch.Generator().manual_seed(1)
    capacities = []
    for _ in range(SHAPE.max_len):
        for layer in range(SHAPE.layers):
            cache.append(layer, *kv(1, gen))
        cache.advance(1)
        capacities.append(cache.nbytes() // per_position)
    assert sorted(set(capacities)) == [2, 4, 8, 16, 20]       # doubling, capped at max_len
    static = STATIC.create(SHAPE, torch.float32, CPU)
    assert cache.nbytes() == static.nbytes()


def test_dynamic_cache_first_append_allocates_what_it_needs():
    cache = DynamicCache(FACTS, DynamicOptions(initial_len=4)).create(SHAPE, torch.float32, CPU)
    keys, _ = cache.append(0, *kv(9, torch.Generator().manual_seed(2)))
    assert keys.shape[2] == 9 and cache.keys[0].shape[2] == 9 and cache.keys[1] is None


def test_int8_cache_memory_is_a_quarter_of_fp32_plus_scales():
    int8 = Int8KVCache(FACTS).create(SHAPE, torch.float32, CPU).nbytes()
    fp32 = STATIC.create(SHAPE, torch.float32, CPU).nbytes()
    assert int8 == fp32 // 4 + fp32 // SHAPE.head_dim        # 1 byte per value + one fp32 scale per row


@pytest.mark.parametrize("backend", [StaticCache(FACTS), DynamicCache(FACTS), Int8KVCache(FACTS)],
                         ids=["static", "dynamic", "int8"])
def test_overflow_names_both_numbers(backend):
    cache = backend.create(SHAPE, torch.float32, CPU)
    gen = torch.Generator().manual_seed(3)
    for layer in range(SHAPE.layers):
        cache.append(layer, *kv(18, gen))
    cache.advance(18)
    with pytest.raises(ContextOverflowError, match="holds 20 positions but this step needs 23"):
        cache.append(0, *kv(5, gen))
    assert cache.length == 18
    cache.append(0, *kv(2, gen))                              # exactly full is fine


# --- grow(): a chat that outgrows its first size keeps what it committed ------------------------------------------

@pytest.mark.parametrize(("backend", "tol"), ALL)
def test_grow_keeps_committed_positions(backend, tol):
    small = replace(SHAPE, max_len=8)
    cache = backend.create(small, torch.float32, CPU)
    assert cache.shape == small and cache.length == 0
    gen = torch.Generator().manual_seed(4)
    committed = [kv(6, gen) for _ in range(SHAPE.layers)]
    for layer, (k, v) in enumerate(committed):
        cache.append(layer, k, v)
    cache.advance(6)
    for layer in range(SHAPE.layers):
        cache.append(layer, *kv(2, gen))                      # a retry: appended, never committed
    with pytest.raises(ContextOverflowError, match="holds 8 positions but this step needs 9"):
        cache.append(0, *kv(3, gen))

    cache.grow(4)                                             # never shrinks
    assert cache.shape == small and cache.length == 6
    cache.grow(24)
    assert cache.shape == replace(small, max_len=24) and cache.length == 6
    fresh = [kv(18, gen) for _ in range(SHAPE.layers)]
    for layer in range(SHAPE.layers):
        keys, values = cache.append(layer, *fresh[layer])
        assert keys.shape == values.shape == (SHAPE.batch, SHAPE.kv_heads, 24, SHAPE.head_dim)
        for got, old, new in ((keys, committed[layer][0], fresh[layer][0]),
                              (values, committed[layer][1], fresh[layer][1])):
            assert relative_error(got[:, :, :6], old) <= tol, layer      # committed before grow: kept
            assert relative_error(got[:, :, 6:], new) <= tol, layer      # the retry's positions: replaced
    cache.advance(18)
    assert cache.length == 24
    with pytest.raises(ContextOverflowError, match="holds 24 positions but this step needs 25"):
        cache.append(0, *kv(1, gen))


def test_grow_after_a_truncate_keeps_only_what_is_still_committed():
    cache = STATIC.create(replace(SHAPE, max_len=6), torch.float32, CPU)
    gen = torch.Generator().manual_seed(5)
    k, v = kv(6, gen)
    for layer in range(SHAPE.layers):
        cache.append(layer, k, v)
    cache.advance(6)
    cache.truncate(2)
    cache.grow(10)
    keys, _ = cache.append(0, *kv(1, gen))
    assert keys.shape[2] == 3 and torch.equal(keys[:, :, :2], k[:, :, :2])
    assert not cache.keys[0][:, :, 3:].any()                 # nothing past the committed positions was copied


# --- per-layer devices: layer i's buffers live on devices[i] --------------------------------------------------------

def _buffers(cache, layer: int) -> list[torch.Tensor]:
    """Every storage tensor of `layer` (int8 adds its scales; a dynamic layer has none before its first append)."""
    names = ("keys", "values", "key_scales", "value_scales")
    return [getattr(cache, n)[layer] for n in names if hasattr(cache, n) and getattr(cache, n)[layer] is not None]


@pytest.mark.parametrize(("backend", "tol"), ALL)
def test_create_takes_one_device_per_layer(backend, tol):
    cache = backend.create(SHAPE, torch.float32, CPU)
    assert cache.shape == SHAPE
    gen = torch.Generator().manual_seed(6)
    for layer in range(SHAPE.layers):
        k, v = kv(3, gen)
        keys, values = cache.append(layer, k, v)
        assert relative_error(keys, k) <= tol and relative_error(values, v) <= tol
    assert len(cache.keys) == len(cache.values) == SHAPE.layers
    assert all(t.device == torch.device("cpu") for layer in range(SHAPE.layers) for t in _buffers(cache, layer))


# The meta device stands in for a second device on a CPU-only machine: a cache that put every layer on devices[0]
# (or on the CPU) would be caught here.
MIXED = (torch.device("cpu"), torch.device("meta"), "cpu")


@pytest.mark.parametrize(("backend", "tol"), ALL)
def test_each_layer_lives_on_its_own_device(backend, tol):
    cache = backend.create(SHAPE, torch.float32, MIXED)
    gen = torch.Generator().manual_seed(7)
    for layer, device in enumerate(MIXED):
        device = torch.device(device)
        k, v = (t.to(device) for t in kv(3, gen))
        keys, values = cache.append(layer, k, v)
        assert keys.device == values.device == device, layer
        assert _buffers(cache, layer) and all(t.device == device for t in _buffers(cache, layer)), layer
    cache.advance(3)
    cache.grow(SHAPE.max_len + 10)
    for layer, device in enumerate(MIXED):
        k, v = (t.to(device) for t in kv(SHAPE.max_len + 5, gen))
        keys, _ = cache.append(layer, k, v)
        assert keys.device == torch.device(device) and keys.shape[2] == SHAPE.max_len + 8
        assert all(t.device == torch.device(device) for t in _buffers(cache, layer)), layer


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("backend", "tol"), ALL)
def test_layers_split_between_cuda_and_cpu(backend, tol):
    shape = replace(SHAPE, layers=2)
    devices = (torch.device("cuda"), torch.device("cpu"))
    cache = backend.create(shape, torch.float32, devices)
    gen = torch.Generator().manual_seed(8)
    first = [kv(5, gen) for _ in devices]
    for layer, device in enumerate(devices):
        keys, values = cache.append(layer, *(t.to(device) for t in first[layer]))
        assert keys.device.type == values.device.type == device.type, layer
        assert all(t.device.type == device.type for t in _buffers(cache, layer)), layer
        assert relative_error(keys, first[layer][0]) <= tol and relative_error(values, first[layer][1]) <= tol
    cache.advance(5)
    cache.grow(shape.max_len * 2)
    for layer, device in enumerate(devices):
        k, v = kv(shape.max_len, gen)
        keys, _ = cache.append(layer, k.to(device), v.to(device))
        assert keys.device.type == device.type, layer
        assert all(t.device.type == device.type for t in _buffers(cache, layer)), layer
        assert relative_error(keys[:, :, :5], first[layer][0]) <= tol       # kept across grow, on its device
        assert relative_error(keys[:, :, 5:], k) <= tol


@pytest.mark.parametrize("bad", [0, -1, "x", 1.5, True])
def test_dynamic_rejects_bad_initial_len(bad):
    with pytest.raises(ConfigError, match=r"kv_cache\.options\.dynamic.*initial_len"):
        build_options(DynamicCache.Options, {"initial_len": bad}, "kv_cache.options.dynamic")


@pytest.mark.parametrize("bad", [0, -1])
def test_dynamic_options_reject_a_non_positive_length_when_built_directly(bad):
    with pytest.raises(ValueError, match=f"initial_len must be a positive position count, got {bad}"):
        DynamicCache.Options(initial_len=bad)


def test_dynamic_options_default_and_from_config():
    assert DynamicCache.Options is DynamicOptions
    assert DynamicCache(FACTS).options == DynamicOptions(initial_len=256)
    built = build_options(DynamicCache.Options, {"initial_len": 3}, "kv_cache.options.dynamic")
    cache = DynamicCache(FACTS, built).create(SHAPE, torch.float32, CPU)
    cache.append(0, *kv(1, torch.Generator().manual_seed(0)))
    assert cache.keys[0].shape[2] == 3                          # the configured first allocation


@pytest.mark.parametrize("cls", [DynamicCache, Int8KVCache])
def test_self_tests_pass_and_validate_is_empty(cls):
    cls(FACTS).self_test(STATIC)
    for facts in (FACTS, make_facts(gpu=AMPERE, stored_dtype="bfloat16")):
        assert cls.validate(facts, cls.Options()) == []
    assert StaticCache.validate(FACTS, NoOptions()) == []


class ForgetfulGrowth(DynamicCache):
    """A plausible bug: growing drops the committed positions."""

    def create(self, shape, dtype, devices):
        cache = super().create(shape, dtype, devices)
        grow = cache._grow

        def bad_grow(layer, needed):
            keys, values = grow(layer, needed)
            return keys.zero_(), values

        cache._grow = bad_grow
        return cache


class NoTruncate(DynamicCache):
    def create(self, shape, dtype, devices):
        cache = super().create(shape, dtype, devices)
        cache.truncate = lambda n: None
        return cache


class Int4KV(Int8KVCache):
    """A plausible bug: 4-bit levels where 8 were promised."""

    def create(self, shape, dtype, devices):
        cache = super().create(shape, dtype, devices)
        append = cache.append

        def coarse_append(layer, k, v):
            keys, values = append(layer, k, v)
            step = keys.abs().amax(dim=-1, keepdim=True) / 7
            return torch.round(keys / step) * step, values

        cache.append = coarse_append
        return cache


@pytest.mark.parametrize(("faulty", "message"), [(ForgetfulGrowth, "relative error"), (NoTruncate, "length"),
                                                 (Int4KV, "relative error")])
def test_faulty_caches_fail_self_test(faulty, message):
    with pytest.raises(SelfTestError, match=message):
        faulty(FACTS).self_test(STATIC)
