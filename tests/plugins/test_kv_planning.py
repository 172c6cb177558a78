"""The KV cache's size before loading comes from the kv_cache plugin (one source): its bytes per position equal what
the plugin really allocates, and the context budget, the memory plan and the plan's kv line all use that figure
and the dtype the loaded model computes in."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.facts import DTYPE_BYTES, KV_RAM_SHARE, ContextFacts, context_budget
from qvl_pipeline.memory_plan import GIB
from qvl_pipeline.slots.kv_cache import CacheShape, planned_kv
from qvl_pipeline.slots.memory import model_bytes
from qvl_pipeline.weight_format import WeightFormat, int8_suggestion
from qvl_plugins.kv_cache.dynamic import DynamicCache
from qvl_plugins.kv_cache.int8 import Int8KVCache
from qvl_plugins.kv_cache.static import StaticCache
from tests.conftest import make_facts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
POSITIONS = 12


def allocated(cache) -> int:
    """Bytes of every tensor the cache object holds (counted here, not by its own nbytes())."""
    tensors = [t for value in vars(cache).values() if isinstance(value, list) for t in value
               if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("backend_cls", [StaticCache, DynamicCache, Int8KVCache], ids=["static", "dynamic", "int8"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_planned_bytes_per_position_equal_what_the_cache_allocates(backend_cls, dtype):
    facts = make_facts(stored_dtype=dtype)
    backend = backend_cls(facts)
    kv = planned_kv(backend, facts)
    text = facts.model.config.text
    shape = CacheShape(text.num_hidden_layers, 1, text.num_key_value_heads, text.head_dim, POSITIONS)
    cache = backend.create(shape, getattr(torch, dtype), ["cpu"] * text.num_hidden_layers)
    for layer in range(text.num_hidden_layers):           # fill to max_len (the dynamic cache allocates on demand)
        k = torch.randn(1, text.num_key_value_heads, POSITIONS, text.head_dim, dtype=getattr(torch, dtype))
        cache.append(layer, k, k)
    assert kv.dtype == dtype
    assert allocated(cache) == POSITIONS * kv.bytes_per_position


def test_int8_takes_about_half_of_bf16_per_position():
    facts = make_facts(stored_dtype="bfloat16")
    static, int8 = (planned_kv(cls(facts), facts).bytes_per_position for cls in (StaticCache, Int8KVCache))
    text = facts.model.config.text
    assert static == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 2
    assert int8 == 2 * text.num_hidden_layers * text.num_key_value_heads * (text.head_dim + 4)   # + fp32 scales


def plan_of(*overrides: str) -> tuple[dict, object]:
    container = make_container(load_config(["model=qwen3_vl_2b", "hardware=cpu_avx2", "opt=aggressive",
                                            "memory.ram_budget_gb=8", *overrides]))
    return container.core.plan().to_dict(), container.core.facts()


def test_int8_kv_cache_gives_a_smaller_figure_and_a_larger_context_in_the_plan():
    static, static_facts = plan_of("kv_cache=static")
    int8, int8_facts = plan_of("kv_cache=int8")
    element = DTYPE_BYTES[static_facts.activation_dtype]                                  # bf16 (or fp32) keys/values
    assert static["kv_cache"]["bytes_per_position"] == 2 * 28 * 8 * 128 * element
    assert int8["kv_cache"]["bytes_per_position"] == 2 * 28 * 8 * (128 + 4)               # int8 + fp32 scales
    assert int8_facts.kv.bytes_per_position == int8["kv_cache"]["bytes_per_position"]
    # The context budget (25% of the RAM budget left after the weights) at each plugin's real figure.
    for plan, facts in ((static, static_facts), (int8, int8_facts)):
        per_position = plan["kv_cache"]["bytes_per_position"]
        spare = 8 * GIB - facts.model.weight_bytes
        assert plan["context"]["positions"] == int(KV_RAM_SHARE * spare // per_position) // 1024 * 1024
        assert f"{per_position / 1024:.1f} KiB per position" in plan["context"]["reason"]
    assert int8["context"]["positions"] > 1.8 * static["context"]["positions"]
    # The memory plan prices the KV cache with the same figure, at the same context.
    for plan in (static, int8):
        memory = plan["model"]["memory"]
        assert memory["positions"] == plan["context"]["positions"]
        assert memory["kv_gib"]["cpu"] == pytest.approx(plan["kv_cache"]["gib_at_context"], abs=2e-3)


def test_the_memory_plan_and_its_refusals_use_the_plugins_figure():
    facts = make_facts(stored_dtype="bfloat16", ram_gb=64.0)
    facts = dataclasses.replace(facts, weights=int8_suggestion("bfloat16"),
                                context=ContextFacts(4096, "test"))
    layers = facts.model.config.text.num_hidden_layers
    for cls in (StaticCache, Int8KVCache):
        kv = planned_kv(cls(facts), facts)
        assert model_bytes(dataclasses.replace(facts, kv=kv)).kv_per_position * layers == kv.bytes_per_position
    # Unknown plugin (facts.kv None): the model's own dtype, as before the kv_cache slot is resolved.
    assert model_bytes(facts).kv_per_position * layers == facts.model.kv_bytes_per_position


def test_an_explicit_or_profile_context_does_not_move_with_the_kv_figure():
    facts = make_facts(stored_dtype="bfloat16")
    requested = context_budget(facts.model, facts.hardware, requested=2048, profile_budget=None)
    assert requested.for_kv(1) is requested
    derived = context_budget(facts.model, facts.hardware, requested=None, profile_budget=None)
    assert derived.ram_share is not None
    small = facts.model.kv_bytes_per_position // 2
    assert derived.for_kv(small).positions >= derived.positions


def test_activation_dtype_is_the_loaders_unless_the_weight_format_widens_it():
    facts = make_facts(stored_dtype="bfloat16")
    assert facts.activation_dtype == "bfloat16"
    assert dataclasses.replace(facts, weights=int8_suggestion("bfloat16")).activation_dtype == "bfloat16"
    assert dataclasses.replace(facts, weights=WeightFormat.stored("float32")).activation_dtype == "float32"


@pytest.mark.parametrize("kernels", ["int8_weight_only", "fp32_compute", "torch_native"])
def test_the_kv_line_before_loading_names_the_dtype_the_loaded_model_uses(kernels):
    """int8_weight_only may compute its linears in another dtype than the model's activations; fp32_compute widens the
    whole model. The plan before loading says what the plan after loading measures (the loaded model's dtype)."""
    container = make_container(load_config(["progress=false", "model.dtype=bfloat16", f"kernels={kernels}",
                                            "kv_cache=static", "generate.max_context=64"]))
    before = container.core.plan().to_dict()["kv_cache"]
    pipe = container.pipeline()
    after = pipe.plan["kv_cache"]
    dtype = str(pipe.model.dtype).removeprefix("torch.")
    assert before["format"] == after["format"] == f"keys/values in {dtype}"
    assert before["bytes_per_position"] == after["bytes_per_position"]
    assert pipe.caches.create(8).nbytes() == 8 * before["bytes_per_position"]
    if kernels == "fp32_compute":
        assert dtype == "float32"
