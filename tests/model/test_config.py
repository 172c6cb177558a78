"""ModelConfig: both rope spellings, round trips, validation messages."""

from __future__ import annotations

import copy
import json

import pytest

from qvl_pipeline.errors import ConfigError
from qvl_pipeline.model.activations import _ACTIVATIONS
from qvl_pipeline.model.config import KNOWN_ACTIVATIONS, ModelConfig
from tests.model.tiny_configs import old_spelling, tiny_hf_dict

# The shape of a released 2B checkpoint's config.json (old rope spelling, vision model_type "qwen3_vl").
RELEASED_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "tie_word_embeddings": True,
    "text_config": {
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
        "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "intermediate_size": 6144, "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
        "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True, "vocab_size": 151936,
    },
    "vision_config": {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
        "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2048,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
    },
}


def test_released_config_reads():
    cfg = ModelConfig.from_hf_dict(RELEASED_2B)
    assert cfg.tie_word_embeddings is True
    assert cfg.text.rope_theta == 5_000_000.0
    assert cfg.text.mrope_section == (24, 20, 20)
    assert (cfg.text.num_attention_heads, cfg.text.num_key_value_heads, cfg.text.head_dim) == (16, 8, 128)
    assert cfg.vision.deepstack_visual_indexes == (5, 11, 17)
    assert cfg.vision.rope_theta == 10000.0
    assert (cfg.vision.head_dim, cfg.vision.patch_dim, cfg.vision.grid_side) == (64, 1536, 48)


@pytest.mark.parametrize("tied", [False, True])
def test_old_and_new_spelling_agree(tied):
    new = tiny_hf_dict(tied=tied)
    assert ModelConfig.from_hf_dict(new) == ModelConfig.from_hf_dict(old_spelling(new))


def test_round_trip_and_json(tmp_path):
    cfg = ModelConfig.from_hf_dict(RELEASED_2B)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    path = tmp_path / "config.json"
    path.write_text(json.dumps(RELEASED_2B))
    assert ModelConfig.from_json(path) == cfg


def test_round_trip_through_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_hf_dict(tiny_hf_dict(tied=True, taps=(2, 0)))
    hf = transformers.Qwen3VLConfig(**cfg.to_hf_dict())
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


def test_tie_falls_back_to_text_config():
    d = copy.deepcopy(RELEASED_2B)
    del d["tie_word_embeddings"]
    assert ModelConfig.from_hf_dict(d).tie_word_embeddings is True
    d["text_config"]["tie_word_embeddings"] = False
    assert ModelConfig.from_hf_dict(d).tie_word_embeddings is False


def test_missing_file_is_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "nope.json")


def _broken(**edits):
    d = copy.deepcopy(RELEASED_2B)
    for path, value in edits.items():
        section, key = path.split("__")
        d[section][key] = value
    return d


@pytest.mark.parametrize(("edits", "message"), [
    ({"vision_config__out_hidden_size": 3584}, r"out_hidden_size=3584 must equal text_config.hidden_size=2048"),
    ({"vision_config__deepstack_visual_indexes": [5, 24]}, r"\[24\] must lie in \[0, depth=24\)"),
    ({"text_config__num_key_value_heads": 6}, r"num_attention_heads=16 is not divisible by num_key_value_heads=6"),
    ({"vision_config__num_heads": 12}, r"hidden_size=1024 is not divisible by num_heads=12"),
    ({"text_config__rope_scaling": {"mrope_section": [24, 20, 16]}}, r"sums to 60 but must sum to head_dim/2=64"),
    ({"text_config__rope_scaling": {"rope_type": "yarn", "mrope_section": [24, 20, 20]}}, r"'yarn' is not supported"),
    ({"vision_config__num_position_embeddings": 2300}, r"2300 is not a square"),
    ({"text_config__hidden_act": "swish2"}, r"'swish2' is not one of"),
    ({"text_config__vocab_size": 1000}, r"image_token_id=151655 lies outside the vocabulary \[0, 1000\)"),
    ({"text_config__hidden_size": "big"}, r"hidden_size must be an integer"),
])
def test_validation_names_the_numbers(edits, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf_dict(_broken(**edits))


def test_activation_lists_agree():
    assert set(KNOWN_ACTIVATIONS) == set(_ACTIVATIONS)
