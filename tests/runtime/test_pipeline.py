"""The assembled pipeline on the embedded demo: contract fields, streaming, chat reuse, runtime fallback."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.registry import PluginRegistry
from tests.foundation.fakes import FAKES

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def demo():
    return Pipeline.from_overrides(["progress=false", "generate.max_new_tokens=6"]).load()


def test_contract_fields_on_the_demo(demo):
    result = demo.generate("What is in the picture?", demo.demo_images())
    for key in ("text", "token_ids", "prompt_tokens", "plan", "timings"):
        assert key in result
    for key in ("load_s", "vision_s", "prefill_s", "decode_tokens_per_s"):
        assert key in result["timings"]
    assert result["demo"] is True and len(result["images"]) == 1     # the generated demo image
    assert 1 <= len(result["token_ids"]) <= 6
    assert set(result["plan"]["slots"]) == {"attention", "rotary", "kernels", "memory", "kv_cache"}
    assert result["prompt_tokens"] > 16                             # the image's placeholder tokens


def test_text_only_skips_the_vision_tower(demo, monkeypatch):
    calls = []
    visual = demo.model.model.visual
    monkeypatch.setattr(type(visual), "forward", lambda *a, **k: calls.append(1))
    result = demo.generate("Say hello.", max_new_tokens=3)
    assert calls == [] and result["images"] == [] and result["timings"]["vision_s"] < 0.5


def test_greedy_is_deterministic_and_streaming_matches_the_text(demo):
    pieces: list[str] = []
    first = demo.generate("Describe.", demo.demo_images(), on_text=pieces.append)
    second = demo.generate("Describe.", demo.demo_images())
    assert first["token_ids"] == second["token_ids"]
    assert "".join(pieces) == first["text"]


def test_sampling_with_a_seed_reproduces(demo):
    a = demo.generate("Describe.", temperature=1.0, seed=7, max_new_tokens=8)
    b = demo.generate("Describe.", temperature=1.0, seed=7, max_new_tokens=8)
    assert a["token_ids"] == b["token_ids"]


def test_chat_reuses_the_cache_and_the_image_features(demo):
    from qvl_pipeline.runtime.pipeline import Conversation

    conversation = Conversation()
    image = demo.demo_images()
    first = demo.chat_turn(conversation, "What is this?", image)
    encoded = len(demo.model.feature_cache)
    second = demo.chat_turn(conversation, "And the colours?")
    assert first["cached_prompt_tokens"] == 0
    assert second["cached_prompt_tokens"] > first["prompt_tokens"] - 1
    assert len(demo.model.feature_cache) == encoded                 # the image was not re-encoded


def test_chat_turn_equals_a_fresh_run_of_the_whole_conversation(demo):
    from qvl_pipeline.runtime.pipeline import Conversation

    image = demo.demo_images()
    conversation = Conversation()
    demo.chat_turn(conversation, "What is this?", image)
    cached = demo.chat_turn(conversation, "More?")
    fresh_conv = Conversation(messages=conversation.messages[:-1], images=list(conversation.images))
    fresh_conv.messages = fresh_conv.messages[:-1]
    fresh = demo.chat_turn(fresh_conv, "More?")
    assert cached["token_ids"] == fresh["token_ids"]


def test_runtime_failure_falls_back_and_the_request_survives():
    container = make_container(load_config(["progress=false", "generate.max_new_tokens=4", "opt=moderate",
                                            "hardware.chains.attention=[crashes_at_run,eager]"]))
    registry = PluginRegistry(discover=None)
    registry.register("attention", "crashes_at_run", FAKES["crashes_at_run"])
    container.core.registry.override(registry)
    pipe = Pipeline.from_container(container)
    reference = Pipeline.from_overrides(["progress=false", "generate.max_new_tokens=4", "attention=eager"])
    result = pipe.generate("Describe.")
    assert result["runtime_fallbacks"] and "no kernel image" in result["runtime_fallbacks"][0]
    assert result["plan"]["slots"]["attention"]["chosen"] == "eager"
    rejected = result["plan"]["slots"]["attention"]["rejected"]
    assert any(r["stage"] == "runtime" and r["plugin"] == "crashes_at_run" for r in rejected)
    assert result["token_ids"] == reference.generate("Describe.")["token_ids"]


def test_bf16_demo_is_finite():
    pipe = Pipeline.from_overrides(["progress=false", "model.dtype=bfloat16", "kernels=torch_native",
                                    "generate.max_new_tokens=3"]).load()
    assert pipe.model.dtype == torch.bfloat16
    assert len(pipe.generate("Describe.")["token_ids"]) >= 1


def test_video_given_as_frames(demo, tmp_path):
    from PIL import Image

    frames = []
    for i in range(4):
        path = tmp_path / f"f{i}.png"
        Image.new("RGB", (96, 64), (40 * i, 100, 200 - 30 * i)).save(path)
        frames.append(str(path))
    result = demo.generate("What happens?", video=frames, max_new_tokens=3)
    assert result["video_frames"] == 4 and len(result["token_ids"]) >= 1
    assert result["prompt_tokens"] > 12
