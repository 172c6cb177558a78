"""The int8 KV cache on a real (tiny) model: greedy agreement and logit error against the static reference within
its stated fidelity (~1% relative), admitted only where opt admits approximate plugins, and the plan stating the
format and where each layer's cache lives."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.generation.engine import feed
from qvl_pipeline.plan import render_plan
from qvl_plugins.kv_cache.int8 import Int8KVCache
from qvl_plugins.kv_cache.static import StaticCache

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
SAME = ["progress=false", "attention=eager", "kernels=torch_native", "model.dtype=float32"]
STEPS = 24


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_overrides([*SAME, "kv_cache=static"])


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "text"])
def test_teacher_forced_logits_and_greedy_choices_agree_with_the_static_cache(pipe, with_image):
    """Both caches decode the same token sequence (the static run's greedy choices): the largest logit difference
    stays within 1% of the largest logit (measured: 3.2e-3 image, 6.9e-3 text), and the greedy choice agrees at
    every step whose top-2 margin exceeds twice that step's error (random weights make near-ties, where a flip is
    the stated approximation; measured 24/24 and 23/24 agreement)."""
    images = pipe.demo_images() if with_image else []
    vision = pipe.images(images) if images else None
    ids = pipe._prompt_ids("Describe this picture in detail." if with_image else "Tell me a story.", vision)
    fused, _ = pipe._fuse(ids, vision)
    model = pipe.model
    shape = model.cache_shape(1, len(ids) + STEPS)
    caches = [backend.create(shape, model.dtype, pipe.caches.devices)
              for backend in (StaticCache(pipe.facts), Int8KVCache(pipe.facts))]
    worst, agree = 0.0, 0
    with torch.inference_mode():
        logits = [feed(model, fused, 0, cache).float() for cache in caches]
        for step in range(STEPS):
            ref, got = logits
            error = float((got - ref).abs().max())
            worst = max(worst, error / float(ref.abs().max()))
            top2 = ref.topk(2).values
            agree += int(got.argmax()) == int(ref.argmax())
            if float(top2[0] - top2[1]) > 2 * error:
                assert int(got.argmax()) == int(ref.argmax()), step
            token = torch.tensor([[int(ref.argmax())]])
            logits = [model.decode_step(token, cache, fused.rope_delta)[0, -1].float() for cache in caches]
    assert 0.0 < worst < 1e-2 and agree >= STEPS - 2
    assert caches[0].length == caches[1].length == len(ids) + STEPS


@pytest.mark.parametrize("hardware", ["auto", "cpu_avx2", "i5_sm61_nvme"])
@pytest.mark.parametrize(("opt", "chosen"), [("minimal", "static"), ("moderate", "static"), ("aggressive", "int8")])
def test_int8_kv_is_admitted_only_at_opt_aggressive(opt, chosen, hardware):
    container = make_container(load_config([f"opt={opt}", f"hardware={hardware}"]))
    decision = container.core.plan().to_dict()["slots"]["kv_cache"]
    assert decision["candidates"][0] == "int8" and decision["chosen"] == chosen
    if chosen != "int8":
        [rejection] = [r for r in decision["rejected"] if r["plugin"] == "int8"]
        assert "fidelity approximate is beyond" in rejection["reasons"][0]


def test_the_plan_states_the_kv_format_and_where_each_layer_lives():
    int8 = Pipeline.from_overrides([*SAME, "kv_cache=int8", "opt=aggressive"])
    text = int8.model.config.text
    kv = int8.plan["kv_cache"]
    assert kv["plugin"] == "int8"
    assert kv["format"].startswith("keys/values in int8 with one fp32 scale per (token, head)")
    assert kv["placement"] == f"layers 0-{text.num_hidden_layers - 1} on cpu"
    assert kv["bytes_per_position"] == 2 * text.num_hidden_layers * text.num_key_value_heads * (text.head_dim + 4)
    cache = int8.caches.create(10)
    assert cache.nbytes() == 10 * kv["bytes_per_position"]                  # the plan's figure is the real one
    assert "kv cache: keys/values in int8" in render_plan(int8.plan)
    static = Pipeline.from_overrides([*SAME, "kv_cache=static"]).plan["kv_cache"]
    assert static["format"] == "keys/values in float32"
    assert static["bytes_per_position"] == 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4


def test_the_plan_before_loading_predicts_the_kv_placement_and_compute_dtype():
    container = make_container(load_config(["opt=aggressive", "hardware=cpu_avx2", "model=qwen3_vl_2b",
                                            "kv_cache=int8"]))
    kv = container.core.plan().to_dict()["kv_cache"]
    assert kv["placement"] == "layers 0-27 on cpu" and kv["bytes_per_position"] == 2 * 28 * 8 * (128 + 4)
