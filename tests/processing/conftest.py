"""Shared inputs for the processing tests: Qwen3-VL preprocessing numbers, demo assets, test images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from qvl_pipeline.processing.demo_assets import write_demo_processor_configs, write_demo_tokenizer

# Qwen3-VL's numbers with a small pixel budget (4 to 64 merged tokens) so the tests stay fast.
QWEN3_IMAGE_CONFIG = {
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 32 * 32 * 4, "longest_edge": 32 * 32 * 64},
}


@pytest.fixture
def image_config() -> dict:
    return {**QWEN3_IMAGE_CONFIG, "size": dict(QWEN3_IMAGE_CONFIG["size"])}


def _test_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Gradients plus noise: smooth and sharp content, so resize differences would show."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    red = xx * 255 // max(width - 1, 1)
    green = yy * 255 // max(height - 1, 1)
    blue = rng.integers(0, 256, (height, width))
    return Image.fromarray(np.stack([red, green, blue], -1).astype(np.uint8))


@pytest.fixture
def make_image():
    """Factory: make_image(height, width, seed=0) -> an RGB PIL image."""
    return _test_image


@pytest.fixture(scope="session")
def demo_folder(tmp_path_factory):
    """A folder with the demo tokenizer, chat template and Qwen3-VL-style preprocessor configs."""
    folder = tmp_path_factory.mktemp("demo_assets")
    write_demo_tokenizer(folder)
    write_demo_processor_configs(folder)
    return folder
