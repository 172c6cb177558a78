"""Hostile processing configs of a checkpoint (preprocessor_config.json, generation_config.json): pathological
JSON and impossible values are one CheckpointError naming the file, never a huge allocation or a wrong stop id."""

from __future__ import annotations

import json

import pytest

from qvl_pipeline.errors import CheckpointError, ConfigError
from qvl_pipeline.processing import ImageProcessor, Tokenizer, read_generation_config, read_vision_config
from qvl_pipeline.processing.demo_assets import write_demo_tokenizer
from qvl_pipeline.processing.stop_tokens import stop_token_ids

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("name", ["preprocessor_config.json", "generation_config.json"])
def test_json_nested_too_deeply(tmp_path, name):
    (tmp_path / name).write_text(DEEP)
    with pytest.raises(CheckpointError) as info:
        read_vision_config(tmp_path) if name.startswith("pre") else read_generation_config(tmp_path)
    assert name in info.value.message and "nested too deeply" in info.value.message


@pytest.mark.parametrize("edit", [
    {"min_pixels": 10**12, "max_pixels": 10**12},          # a small image would be upscaled to a terapixel
    {"size": {"shortest_edge": 10**6, "longest_edge": 4096}},
    {"image_mean": [float("nan"), 0.5, 0.5]},
    {"image_std": [float("inf"), 0.5, 0.5]},
    {"rescale_factor": float("nan")},
], ids=["terapixel budget", "min over max", "NaN mean", "inf std", "NaN rescale"])
def test_impossible_preprocessor_values(tmp_path, image_config, edit):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**image_config, **edit}))
    with pytest.raises(CheckpointError, match="impossible values"):
        ImageProcessor.from_folder(tmp_path)


def test_pixel_cap_below_the_configs_minimum_wins(image_config, make_image):
    image_config["size"] = {"shortest_edge": 256 * 256, "longest_edge": 2**20}
    processor = ImageProcessor(image_config, max_pixels=64 * 64)   # a profile's cap below the config's minimum
    vision = processor([make_image(10, 10)])
    assert vision.grid_thw[0].tolist() == [1, 4, 4]                  # 64×64 pixels, not upscaled to 256×256


def test_explicit_minimum_over_maximum(image_config):
    with pytest.raises(ConfigError, match="min_pixels=8192 is larger than max_pixels=2048"):
        ImageProcessor(image_config, min_pixels=8192, max_pixels=2048)


@pytest.mark.parametrize("eos", ["151645", True, [1, "2"], 10**9, -1, {"id": 3}])
def test_malformed_eos_token_id(tmp_path, eos):
    write_demo_tokenizer(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    with pytest.raises(CheckpointError, match="eos_token_id"):
        stop_token_ids(read_generation_config(tmp_path), Tokenizer.from_folder(tmp_path))
