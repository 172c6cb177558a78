"""The composition root: the container builds what runs, `.override()` changes what runs, facts come from the
checkpoint that is loaded, and each part lives where its plan says."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dependency_injector import providers

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.model.fusion import FeatureCache
from qvl_pipeline.plan import render_plan
from qvl_pipeline.registry import PluginRegistry
from qvl_pipeline.runtime.assembly import KVCaches, LoadedModel
from qvl_pipeline.slots import Placement
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.kv_cache.static import StaticCache
from tests.conftest import make_facts, write_tiny_checkpoint
from tests.foundation.fakes import FAKES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
QUICK = ["progress=false", "generate.max_new_tokens=3", "opt=minimal"]


class CountingAttention(EagerAttention):
    """Eager attention that counts its calls (to prove which plugin a run executed)."""

    calls = 0

    def attend(self, q, k, v, *, causal, scale):
        CountingAttention.calls += 1
        return super().attend(q, k, v, causal=causal, scale=scale)


def test_the_stages_share_the_resolved_plugins_through_their_guards():
    container = make_container(load_config(["opt=minimal"]))
    assert container.core.attention().name == "eager" and container.core.kv_cache().name == "static"
    pipe = container.pipeline()
    layer = pipe.model.model.language_model.layers[0].self_attn
    assert layer._attention is container.core.attention_guard()
    assert pipe.model.model.visual.blocks[0].attn._attention is container.core.attention_guard()


def test_overriding_a_slot_changes_what_the_run_executes():
    container = make_container(load_config(QUICK))
    counting = CountingAttention(container.core.facts(), name="counting")
    container.core.attention.override(providers.Object(counting))
    CountingAttention.calls = 0
    pipe = container.pipeline()
    pipe.generate("Say hello.")
    assert CountingAttention.calls > 0


def test_overriding_the_registry_changes_what_the_chain_picks():
    container = make_container(load_config([*QUICK, "opt=moderate", "hardware.chains.attention=[good,eager]"]))
    registry = PluginRegistry(discover=None)
    registry.register("attention", "good", FAKES["good"])
    container.core.registry.override(registry)
    pipe = container.pipeline()
    assert pipe.plan["slots"]["attention"]["chosen"] == "good"


def test_overriding_a_part_changes_what_the_run_executes():
    container = make_container(load_config(QUICK))
    cache = FeatureCache(4)
    container.features.cache.override(providers.Object(cache))
    pipe = container.pipeline()
    pipe.generate("What is it?", pipe.demo_images())
    assert pipe.model.feature_cache is cache and len(cache) == 1


def test_facts_and_plan_come_from_the_checkpoint_not_the_preset():
    folder = write_tiny_checkpoint(layers=2)
    container = make_container(load_config([f"model.path={folder}", "progress=false"]))
    facts = container.core.facts()
    assert facts.model.config.text.num_hidden_layers == 2          # the tiny preset says 4
    plan = container.core.plan().to_dict()
    assert plan["model"]["parameters"]["decoder_layers"] == 2
    assert f"checkpoint {folder}" in render_plan(plan) and "2 decoder layers" in render_plan(plan)


def test_chat_cache_is_not_max_position_embeddings():
    from qvl_pipeline.runtime.pipeline import Conversation

    folder = write_tiny_checkpoint(layers=2, max_position_embeddings=262144)
    pipe = make_container(load_config([f"model.path={folder}", *QUICK])).pipeline()
    conversation = Conversation()
    pipe.chat_turn(conversation, "Hello there.")
    assert conversation.cache is not None and conversation.cache.shape.max_len <= 1024
    long_turn = " ".join(["word"] * 1500)
    pipe.chat_turn(conversation, long_turn)                            # grows on demand, keeps the prefix
    assert 1024 < conversation.cache.shape.max_len <= pipe.facts.context.positions


def test_context_budget_for_2b_on_a_16_gb_laptop_is_far_below_max_position_embeddings():
    from qvl_pipeline.facts import ModelFacts, context_budget
    from qvl_pipeline.model.config import ModelConfig

    hf = load_config(["model=qwen3_vl_2b"]).model.hf_config
    model = ModelFacts(ModelConfig.from_hf_dict(hf), hf, "bfloat16", "preset")
    laptop = make_facts(ram_gb=16.0).hardware
    context = context_budget(model, laptop, requested=None, profile_budget=None)
    assert model.kv_bytes_per_position == 2 * 28 * 8 * 128 * 2
    # 25% of (16 GiB - 3.96 GiB of weights) at 112 KiB per position: ~28k positions, not 262,144 (28 GiB)
    assert 16384 <= context.positions <= 32768 and context.positions * model.kv_bytes_per_position < 4 * 1024**3
    assert context_budget(model, laptop, requested=8192, profile_budget=None).positions == 8192
    assert context_budget(model, laptop, requested=None, profile_budget=4096).positions == 4096


def test_each_layers_kv_cache_lives_where_the_layer_computes():
    facts = make_facts()
    model = torch.nn.Module()
    model.cache_shape = lambda batch, max_len: __import__("qvl_pipeline.slots", fromlist=["CacheShape"]).CacheShape(
        layers=2, batch=batch, kv_heads=2, head_dim=4, max_len=max_len)
    model.dtype = torch.float32
    loaded = LoadedModel(model, None, Placement("cpu", "cpu", "cpu", ("cpu", "meta")), 0.0)
    cache = KVCaches(StaticCache(facts), loaded).create(8)
    assert cache.keys[0].device.type == "cpu" and cache.keys[1].device.type == "meta"


def test_the_default_path_on_a_bf16_checkpoint_does_not_upcast(tmp_path):
    """hardware=auto opt=moderate (the defaults) on a bf16 checkpoint: int8 weights, never an fp32 copy."""
    folder = write_tiny_checkpoint(layers=2, seed=3)
    config = json.loads((folder / "config.json").read_text())
    config["dtype"] = "bfloat16"
    bf16 = tmp_path / "bf16"
    shutil.copytree(folder, bf16)
    (bf16 / "config.json").write_text(json.dumps(config))
    pipe = make_container(load_config([f"model.path={bf16}", "progress=false"])).pipeline()
    assert pipe.plan["slots"]["kernels"]["chosen"] in ("int8_dynamic", "int8_weight_only")   # no compiler: ATen
    upcast = [name for name, t in [*pipe.model.named_parameters(), *pipe.model.named_buffers()]
              if t.dtype == torch.float32 and t.dim() > 1]
    assert upcast == []                   # no fp32 matrix: bf16 embeddings, int8 linears (fp32 per-row scales only)
    assert len(pipe.generate("Hello.", max_new_tokens=2)["token_ids"]) >= 1


def _edited_checkpoint(tmp_path, name, edit):
    folder = write_tiny_checkpoint(layers=2, seed=4)
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    config = json.loads((copy / name).read_text())
    edit(config)
    (copy / name).write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(("name", "edit", "message"), [
    ("config.json", lambda c: c.update(image_token_id=c["image_token_id"] + 1), "image_token_id"),
    ("preprocessor_config.json", lambda c: c.update(patch_size=14), "patch_size"),
])
def test_a_checkpoint_whose_config_disagrees_with_its_tokenizer_or_processor_is_refused_at_load(tmp_path, name, edit,
                                                                                               message):
    from qvl_pipeline.errors import CheckpointError

    folder = _edited_checkpoint(tmp_path, name, edit)
    with pytest.raises(CheckpointError, match=message):
        make_container(load_config([f"model.path={folder}", *QUICK])).pipeline()


def test_typed_control_tokens_are_text_unless_the_config_allows_them():
    pipe = make_container(load_config(QUICK)).pipeline()
    plain = pipe.generate("<|im_end|>", max_new_tokens=1)["prompt_tokens"]
    unsafe = make_container(load_config([*QUICK, "processing.allow_special_tokens=true"])).pipeline()
    assert unsafe.generate("<|im_end|>", max_new_tokens=1)["prompt_tokens"] < plain
