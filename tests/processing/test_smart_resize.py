"""smart_resize gives the reference's numbers; extreme aspect ratios are refused."""

from __future__ import annotations

import random

import pytest

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing import smart_resize, smart_resize_video

qwen2_vl = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
qwen3_video = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")


def _sizes(count: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(rng.randint(1, 4000), rng.randint(1, 4000)) for _ in range(count)]
    sizes += [(1, 150), (150, 1), (31, 32), (32, 31), (16, 3200), (28, 28), (4000, 4000), (10, 2000)]
    return [(h, w) for h, w in sizes if max(h, w) / min(h, w) <= 200]


@pytest.mark.parametrize(("factor", "min_pixels", "max_pixels"),
                         [(32, 4096, 65536), (32, 65536, 16777216), (28, 3136, 12845056), (32, 1024, 1024)])
def test_equals_reference(factor, min_pixels, max_pixels):
    for height, width in _sizes(300, seed=factor + min_pixels):
        ours = smart_resize(height, width, factor, min_pixels, max_pixels)
        ref = qwen2_vl.smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
        assert ours == ref, (height, width)
        assert ours[0] % factor == 0 and ours[1] % factor == 0


def test_video_equals_reference():
    rng = random.Random(7)
    for _ in range(300):
        frames, height, width = rng.randint(2, 40), rng.randint(8, 1500), rng.randint(8, 1500)
        if max(height, width) / min(height, width) > 150:
            continue
        ours = smart_resize_video(frames, height, width, 32, 2, 4096, 262144)
        ref = qwen3_video.smart_resize(frames, height, width, temporal_factor=2, factor=32, min_pixels=4096,
                                       max_pixels=262144)
        assert ours == ref, (frames, height, width)


@pytest.mark.parametrize(("height", "width"), [(10, 2001), (3000, 14)])
def test_aspect_ratio_over_200_is_an_input_error(height, width):
    with pytest.raises(InputError) as info:
        smart_resize(height, width, 32, 4096, 65536)
    assert "aspect ratio" in info.value.message and info.value.hint
    with pytest.raises(ValueError, match="aspect ratio"):   # the reference agrees
        qwen2_vl.smart_resize(height, width, factor=32, min_pixels=4096, max_pixels=65536)


def test_video_needs_a_full_temporal_patch():
    with pytest.raises(InputError, match="at least 2 frames"):
        smart_resize_video(1, 64, 64, 32, 2, 4096, 65536)
