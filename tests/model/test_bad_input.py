"""Requests the model cannot take raise InputError naming the numbers, never a torch shape traceback."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.errors import InputError
from qvl_pipeline.generation.greedy import greedy_generate
from qvl_plugins.kv_cache.static import StaticCache
from tests.model.tiny_configs import FACTS, IMAGE, VIDEO, images, our_model, prompt, tiny_hf_dict, video


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return our_model(tiny_hf_dict(max_positions=64))


@pytest.fixture(scope="module")
def two_images():
    pytest.importorskip("transformers")          # the reference image processor makes the pixels
    return images([(50, 70), (90, 45)])


def test_too_few_placeholders(model, two_images):
    pv, grid = two_images
    ids = prompt(grid)
    features = int(grid.prod(-1).sum()) // 4
    ids = torch.cat([ids[:, :6], ids[:, 7:]], dim=1)              # drop the first placeholder
    with pytest.raises(InputError, match=rf"{features - 1} image placeholder tokens but .* {features} image features"):
        model.prepare(ids, pv, grid)


def test_placeholders_without_pixels(model, two_images):
    _, grid = two_images
    ids = prompt(grid)
    n = int((ids == IMAGE).sum())
    with pytest.raises(InputError, match=rf"{n} image placeholder tokens but the image encoder produced 0"):
        model.prepare(ids)


def test_video_placeholders_without_video(model):
    _, vgrid = video(2, 4, 4)
    with pytest.raises(InputError, match=r"8 video placeholder tokens .* produced 0 video features"):
        model.prepare(prompt(None, vgrid))


def test_grid_not_divisible_by_merge(model):
    grid = torch.tensor([[1, 3, 4]])
    pixels = torch.zeros(12, 3 * 2 * 16 * 16)
    with pytest.raises(InputError, match=r"grid 0 is 3×4 patches, not divisible by the spatial merge size 2"):
        model.encode_images(pixels, grid)


@pytest.mark.parametrize(("rows", "cols", "message"), [
    (39, 1536, r"pixel_values has shape \[39, 1536\] but the grids .* need \[40, 1536\]"),
    (40, 1535, r"pixel_values has shape \[40, 1535\] but .* need \[40, 1536\]"),
])
def test_pixel_values_of_the_wrong_shape(model, rows, cols, message):
    grid = torch.tensor([[1, 4, 4], [1, 6, 4]])
    with pytest.raises(InputError, match=message):
        model.encode_images(torch.zeros(rows, cols), grid)


def test_pixel_values_must_be_two_dimensional(model):
    with pytest.raises(InputError, match=r"pixel_values has shape \[1, 16, 1536\]"):
        model.encode_images(torch.zeros(1, 16, 1536), torch.tensor([[1, 4, 4]]))


def test_bad_grid_shape(model):
    with pytest.raises(InputError, match=r"grid_thw must have shape \[images, 3\], got \[2\]"):
        model.encode_images(torch.zeros(16, 1536), torch.tensor([4, 4]))


def test_prompt_beyond_max_positions(model):
    ids = torch.arange(70)[None] % 200
    with pytest.raises(InputError, match="position 69 is beyond the model's max_position_embeddings=64"):
        model.prepare(ids)


def test_generation_beyond_max_positions(model):
    ids = torch.arange(60)[None] % 200
    with pytest.raises(InputError, match="position 64 is beyond the model's max_position_embeddings=64"):
        greedy_generate(model, ids, max_new_tokens=10, cache_backend=StaticCache(FACTS))


def test_token_ids_outside_the_vocabulary(model):
    with pytest.raises(InputError, match=r"token ids span \[3, 300\] but the vocabulary has 256 entries"):
        model.prepare(torch.tensor([[3, 300]]))


def test_frames_of_a_video_in_one_run(model):
    pv, grid = video(2, 4, 4)
    ids = torch.tensor([[1, 2, *([VIDEO] * 8), 3]])
    with pytest.raises(InputError, match=r"video frame placeholder run at tokens 2..9 has 8 tokens but its grid"):
        model.prepare(ids, pixel_values_videos=pv, video_grid_thw=grid)


def test_pixels_without_grid(model):
    with pytest.raises(InputError, match="pixel_values were given without image_grid_thw"):
        model.prepare(torch.tensor([[1, 2]]), torch.zeros(16, 1536))
