"""preprocessor_config.json parsing: both pixel-budget spellings, reference defaults, sanity checks."""

from __future__ import annotations

import json

import pytest

from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.processing import parse_vision_config, read_vision_config

# As shipped with Qwen3-VL checkpoints (size dict) and Qwen2-VL ones (top-level min/max pixels).
QWEN3_FILE = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
              "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
              "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
              "image_processor_type": "Qwen2VLImageProcessorFast"}
QWEN2_FILE = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
              "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711], "image_processor_type": "Qwen2VLImageProcessor"}


def test_qwen3_spelling():
    config = parse_vision_config(QWEN3_FILE)
    assert (config.patch_size, config.merge_size, config.temporal_patch_size, config.factor) == (16, 2, 2, 32)
    assert (config.min_pixels, config.max_pixels) == (65536, 16777216)
    assert config.image_mean == config.image_std == (0.5, 0.5, 0.5)
    assert config.rescale_factor == 1 / 255 and config.resample == 3


def test_qwen2_spelling_and_top_level_wins():
    config = parse_vision_config(QWEN2_FILE)
    assert (config.min_pixels, config.max_pixels, config.patch_size) == (3136, 12845056, 14)
    both = parse_vision_config({**QWEN3_FILE, "max_pixels": 1_000_000})
    assert both.max_pixels == 1_000_000 and both.min_pixels == 65536


def test_absent_keys_take_reference_class_defaults():
    image, video = parse_vision_config({}), parse_vision_config({}, video=True)
    assert image.patch_size == 14 and image.image_mean[0] == pytest.approx(0.48145466)
    assert (image.min_pixels, image.max_pixels) == (56 * 56, 28 * 28 * 1280)
    assert video.patch_size == 16 and video.image_mean == (0.5, 0.5, 0.5)
    assert (video.min_pixels, video.max_pixels) == (128 * 32 * 32, 32 * 32 * 768)


def test_override_pixels():
    config = parse_vision_config(QWEN3_FILE).with_pixels(max_pixels=200_000)
    assert (config.min_pixels, config.max_pixels) == (65536, 200_000)


def test_check_against_vision_config():
    config = parse_vision_config(QWEN3_FILE)
    config.check_against({"patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2})
    with pytest.raises(CheckpointError, match="patch_size=16"):
        parse_vision_config(QWEN2_FILE).check_against({"patch_size": 16})


@pytest.mark.parametrize("bad", [{"patch_size": "sixteen"}, {"patch_size": -1}, {"image_std": [0, 1, 1]},
                                 {"size": {"longest_edge": 10}}])
def test_malformed_values(bad):
    with pytest.raises(CheckpointError, match="preprocessor config"):
        parse_vision_config({**QWEN3_FILE, **bad})


def test_read_from_folder_with_video_fallback(tmp_path):
    with pytest.raises(CheckpointError, match=r"no preprocessor_config\.json"):
        read_vision_config(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(QWEN3_FILE))
    assert read_vision_config(tmp_path).max_pixels == 16777216
    assert read_vision_config(tmp_path, video=True).max_pixels == 16777216
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {**QWEN3_FILE, "size": {"longest_edge": 25165824, "shortest_edge": 4096}}))
    assert read_vision_config(tmp_path, video=True).max_pixels == 25165824
    (tmp_path / "preprocessor_config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_vision_config(tmp_path)
