"""Index maths against the reference helpers, plus the errors they raise."""

from __future__ import annotations

import pytest
import torch

from qvl_pipeline.errors import InputError
from qvl_pipeline.model.positions import (
    decode_position_ids,
    mrope_position_ids,
    pos_embed_taps,
    text_position_ids,
    token_types,
    vision_cu_seqlens,
    vision_rotary_positions,
)
from tests.model.tiny_configs import IMAGE, MERGE, VIDEO, hf_model, images, mm_token_types, prompt, tiny_hf_dict, video

transformers = pytest.importorskip("transformers")
from transformers import vision_utils  # noqa: E402

GRIDS = torch.tensor([[1, 4, 6], [2, 6, 2], [1, 10, 8], [3, 2, 2]])


def test_vision_positions_match_reference():
    ref = vision_utils.get_vision_position_ids(GRIDS, MERGE)
    assert torch.equal(vision_rotary_positions(GRIDS, MERGE), ref)


def test_cu_seqlens_match_reference():
    assert torch.equal(vision_cu_seqlens(GRIDS), vision_utils.get_vision_cu_seqlens(GRIDS))


@pytest.mark.parametrize("side", [8, 48])
def test_pos_embed_taps_match_reference(side):
    ref_idx, ref_w = vision_utils.get_vision_interpolation_indices_and_weights(
        GRIDS, num_grid_per_side=side, mode="bilinear", align_corners=True, spatial_merge_size=MERGE)
    idx, w = pos_embed_taps(GRIDS, side, MERGE)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(w, ref_w)


def _oracle_rope(ids, image_grid, video_grid):
    oracle = hf_model(tiny_hf_dict())
    return oracle.model.get_rope_index(ids, mm_token_types(ids), image_grid_thw=image_grid,
                                       video_grid_thw=video_grid)


@pytest.mark.parametrize("case", ["images", "video", "both", "text"])
def test_mrope_positions_match_reference(case):
    _, image_grid = images([(50, 70), (90, 45), (33, 100)]) if case in ("images", "both") else (None, None)
    video_grid = video(3, 4, 6)[1] if case in ("video", "both") else None
    ids = prompt(image_grid, video_grid, seed=3)
    ref_pos, ref_delta = _oracle_rope(ids, image_grid, video_grid)
    pos, delta = mrope_position_ids(token_types(ids, IMAGE, VIDEO), image_grid, video_grid, MERGE)
    assert torch.equal(pos, ref_pos)
    assert delta.tolist() == ref_delta[:, 0].tolist()
    if case == "text":
        assert torch.equal(pos, text_position_ids(1, ids.shape[1]))


def test_mrope_batch_consumes_grids_in_order():
    _, grid = images([(50, 70), (90, 45)])
    row0, row1 = prompt(grid[:1], seed=1)[0], prompt(grid[1:], seed=2)[0]
    width = max(len(row0), len(row1))
    pad = [torch.cat([r, torch.full((width - len(r),), 7)]) for r in (row0, row1)]   # right-pad with text
    ids = torch.stack(pad)
    ref_pos, ref_delta = _oracle_rope(ids, grid, None)
    pos, delta = mrope_position_ids(token_types(ids, IMAGE, VIDEO), grid, None, MERGE)
    assert torch.equal(pos, ref_pos)
    assert delta.tolist() == ref_delta[:, 0].tolist()


def test_decode_positions_continue_with_delta():
    pos = decode_position_ids(20, torch.tensor([-7, 0]), new_tokens=2)
    assert pos.shape == (3, 2, 2)
    assert pos[:, 0].tolist() == [[13, 14]] * 3
    assert pos[:, 1].tolist() == [[20, 21]] * 3


def test_run_length_mismatch_is_input_error():
    _, grid = images([(50, 70)])
    ids = prompt(grid)
    need = int(grid.prod()) // MERGE ** 2
    ids = torch.cat([ids[:, :7], ids[:, 8:]], dim=1)          # drop one placeholder
    t, h, w = grid[0].tolist()
    with pytest.raises(InputError, match=rf"has {need - 1} tokens but its grid \[{t}, {h}, {w}\] needs {need}"):
        mrope_position_ids(token_types(ids, IMAGE, VIDEO), grid, None, MERGE)


def test_grid_and_run_counts_must_agree():
    _, grid = images([(50, 70), (90, 45)])
    ids = prompt(grid[:1])
    with pytest.raises(InputError, match=r"2 image grids were given but the prompt has 1"):
        mrope_position_ids(token_types(ids, IMAGE, VIDEO), grid, None, MERGE)
    with pytest.raises(InputError, match=r"more image placeholder runs than image grids \(0 given\)"):
        mrope_position_ids(token_types(ids, IMAGE, VIDEO), None, None, MERGE)


def test_video_frames_need_their_own_runs():
    grid = torch.tensor([[2, 4, 4]])
    ids = torch.tensor([[1, 2, *([VIDEO] * 8), 3]])          # both frames in one run: no timestamp between
    with pytest.raises(InputError, match=r"video frame placeholder run at tokens 2\.\.9 has 8 tokens"):
        mrope_position_ids(token_types(ids, IMAGE, VIDEO), None, grid, MERGE)


def test_positions_beyond_the_limit():
    types = torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(InputError, match="position 9 is beyond the model's max_position_embeddings=8"):
        mrope_position_ids(types, None, None, MERGE, max_positions=8)
    with pytest.raises(InputError, match=r"position 12 is beyond .*=12"):
        decode_position_ids(10, torch.tensor([2]), max_positions=12)
