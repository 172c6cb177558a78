"""KVCache.relocate: after an out-of-memory moved decoder layers, each layer's cache follows its layer to the new
device keeping every committed position (the meta device stands in for a second device on a CPU-only machine)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from qvl_pipeline.slots.kv_cache import CacheShape
from qvl_pipeline.slots.selftest import relative_error
from qvl_plugins.kv_cache.dynamic import DynamicCache, DynamicOptions
from qvl_plugins.kv_cache.int8 import Int8KVCache
from qvl_plugins.kv_cache.static import StaticCache
from tests.conftest import make_facts

FACTS = make_facts()
SHAPE = CacheShape(layers=3, batch=1, kv_heads=2, head_dim=8, max_len=16)
CPU = ("cpu",) * SHAPE.layers
BACKENDS = [pytest.param(StaticCache(FACTS), 0.0, id="static"),
            pytest.param(DynamicCache(FACTS, DynamicOptions(initial_len=2)), 0.0, id="dynamic"),
            pytest.param(Int8KVCache(FACTS), 2e-2, id="int8")]
STORAGE = ("keys", "values", "key_scales", "value_scales")


def kv(new: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(torch.randn(1, SHAPE.kv_heads, new, SHAPE.head_dim, generator=gen) for _ in range(2))


def filled(backend, gen):
    """A cache holding 5 committed positions in every layer, plus a retry's 2 uncommitted ones."""
    cache = backend.create(SHAPE, torch.float32, CPU)
    written = [kv(5, gen) for _ in range(SHAPE.layers)]
    for layer, (k, v) in enumerate(written):
        cache.append(layer, k, v)
    cache.advance(5)
    for layer in range(SHAPE.layers):
        cache.append(layer, *kv(2, gen))
    return cache, written


@pytest.mark.parametrize(("backend", "tol"), BACKENDS)
def test_relocate_keeps_every_committed_position_and_decoding_goes_on(backend, tol):
    gen = torch.Generator().manual_seed(0)
    cache, written = filled(backend, gen)
    reference, _ = filled(StaticCache(FACTS), torch.Generator().manual_seed(0))
    cache.relocate(CPU)
    assert cache.length == 5
    step = [kv(1, gen) for _ in range(SHAPE.layers)]
    for layer in range(SHAPE.layers):
        keys, values = cache.append(layer, *step[layer])
        want_k, want_v = reference.append(layer, *step[layer])
        assert keys.shape[2] == 6 and relative_error(keys[:, :, :5], written[layer][0]) <= tol
        assert relative_error(keys, want_k) <= tol and relative_error(values, want_v) <= tol
    cache.advance(1)
    assert cache.length == 6


@pytest.mark.parametrize(("backend", "tol"), BACKENDS)
def test_relocate_moves_each_layer_to_its_new_device(backend, tol):
    cache, written = filled(backend, torch.Generator().manual_seed(1))
    cache.relocate(("cpu", "meta", "cpu"))
    for layer, device in enumerate(("cpu", "meta", "cpu")):
        buffers = [getattr(cache, name)[layer] for name in STORAGE if hasattr(cache, name)]
        assert buffers and all(t.device.type == device for t in buffers), layer
    keys, _ = cache.append(2, *kv(1, torch.Generator().manual_seed(2)))       # a CPU layer still holds its values
    assert relative_error(keys[:, :, :5], written[2][0]) <= tol
    cache.grow(SHAPE.max_len + 4)                                            # and growing keeps each layer's device
    assert cache.shape == replace(SHAPE, max_len=SHAPE.max_len + 4)
    k, v = (t.to("meta") for t in kv(1, torch.Generator().manual_seed(3)))
    assert cache.append(1, k, v)[0].device.type == "meta"


@pytest.mark.parametrize(("backend", "tol"), BACKENDS)
def test_relocate_needs_one_device_per_layer(backend, tol):
    cache = backend.create(SHAPE, torch.float32, CPU)
    with pytest.raises(ValueError, match="needs one device per layer, got 2"):
        cache.relocate(("cpu", "cpu"))


def test_the_dynamic_cache_allocates_later_layers_on_their_new_device():
    cache = DynamicCache(FACTS, DynamicOptions(initial_len=2)).create(SHAPE, torch.float32, CPU)
    cache.relocate(("cpu", "cpu", "meta"))                                   # nothing allocated yet
    k, v = (t.to("meta") for t in kv(3, torch.Generator().manual_seed(4)))
    assert cache.append(2, k, v)[0].device.type == "meta" and cache.keys[2].device.type == "meta"
