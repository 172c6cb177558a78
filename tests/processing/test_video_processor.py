"""Videos as frame lists: grids, pixels and timestamps follow the Qwen3-VL video processor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qvl_pipeline.errors import InputError
from qvl_pipeline.processing import VideoClip, VideoProcessor, frame_timestamps, patchify

video_ref = pytest.importorskip("transformers.models.qwen3_vl.video_processing_qwen3_vl")
processing_ref = pytest.importorskip("transformers.models.qwen3_vl.processing_qwen3_vl")

CLIPS = [(5, 70, 90), (4, 33, 200), (7, 300, 301), (2, 20, 20)]


def _frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, height, width, 3), dtype=np.uint8)


@pytest.fixture
def video_config(image_config) -> dict:
    return {**image_config, "size": {"shortest_edge": 4096, "longest_edge": 4 * 65536}}


@pytest.mark.parametrize(("indices", "fps"), [([0, 1, 2, 3, 4], 2.0), ([0, 12, 24, 36], 24.0), ([3], 1.5),
                                              (list(range(0, 70, 7)), 29.97)])
def test_timestamps_equal_reference(indices, fps):
    ref = processing_ref.Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)
    assert frame_timestamps(indices, fps, 2) == ref


@pytest.mark.parametrize(("count", "height", "width"), CLIPS)
def test_grid_and_timestamps(video_config, count, height, width):
    frames = [Image.fromarray(f) for f in _frames(count, height, width)]
    out = VideoProcessor(video_config)([VideoClip(frames, fps=2.0)])
    h, w = video_ref.smart_resize(count, height, width, temporal_factor=2, factor=32, min_pixels=4096,
                                  max_pixels=4 * 65536)
    assert out.grid_thw.tolist() == [[(count + 1) // 2, h // 16, w // 16]]
    assert out.pixel_values.shape == ((count + 1) // 2 * (h // 16) * (w // 16), 1536)
    assert out.timestamps == [processing_ref.Qwen3VLProcessor._calculate_timestamps(None, list(range(count)), 2.0, 2)]
    assert out.token_counts() == [int(out.grid_thw[0].prod()) // 4]


def test_video_patchify_equals_reference_patchify():
    frames = torch.from_numpy(np.random.default_rng(1).standard_normal((5, 3, 64, 96)).astype(np.float32))
    ref_rows, gt, gh, gw = video_ref.Qwen3VLVideoProcessor.patchify(None, frames[None], 16, 2, 2)
    rows, grid = patchify(frames, 16, 2, 2)     # 5 frames: the last is repeated to fill the third patch
    assert grid == (gt, gh, gw) == (3, 4, 6)
    assert torch.equal(rows, ref_rows[0])


@pytest.mark.parametrize(("count", "height", "width"), CLIPS)
def test_pixels_equal_reference_video_processor(video_config, count, height, width):
    pytest.importorskip("torchvision")
    frames = _frames(count, height, width, seed=count)
    ref = video_ref.Qwen3VLVideoProcessor(**video_config)(
        videos=[frames], video_metadata=[{"fps": 2.0, "total_num_frames": count, "frames_indices": list(range(count))}],
        do_sample_frames=False, cap_pixels_per_frame=False, return_tensors="pt")
    ours = VideoProcessor(video_config)([VideoClip([Image.fromarray(f) for f in frames], fps=2.0)])
    assert torch.equal(ours.grid_thw, ref["video_grid_thw"])
    assert (ours.pixel_values - ref["pixel_values_videos"]).abs().max().item() == 0.0


def test_per_frame_cap_lowers_the_budget(video_config):
    frames = [Image.fromarray(f) for f in _frames(4, 400, 400)]
    free = VideoProcessor(video_config)([frames])
    capped = VideoProcessor(video_config, cap_pixels_per_frame=True, max_video_tokens=4)([frames])
    assert capped.grid_thw[0, 1:].prod() < free.grid_thw[0, 1:].prod()
    assert capped.grid_thw[0, 1:].prod() // 4 <= 8


def test_plain_frame_list_defaults_to_24_fps(video_config):
    frames = [Image.fromarray(f) for f in _frames(4, 64, 64)]
    out = VideoProcessor(video_config)([frames])
    assert out.timestamps == [pytest.approx([0.5 / 24, 2.5 / 24])]


def test_frames_of_different_sizes(video_config):
    frames = [Image.fromarray(_frames(1, 64, 64)[0]), Image.fromarray(_frames(1, 64, 96)[0])]
    with pytest.raises(InputError, match="differ in size"):
        VideoProcessor(video_config)([frames])


def test_single_frame_video_is_refused_like_the_reference(video_config):
    with pytest.raises(InputError, match="at least 2 frames"):
        VideoProcessor(video_config)([[Image.fromarray(_frames(1, 64, 64)[0])]])


def test_indices_must_match_frames(video_config):
    frames = [Image.fromarray(f) for f in _frames(4, 64, 64)]
    with pytest.raises(InputError, match="frame indices"):
        VideoProcessor(video_config)([VideoClip(frames, fps=2.0, frame_indices=[0, 1])])
