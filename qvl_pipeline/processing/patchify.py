"""Cut normalised frames into the flat patch rows the vision encoder's Conv3d patch embedding reads."""

from __future__ import annotations

import torch


def patchify(frames: torch.Tensor, patch_size: int, merge_size: int,
             temporal_patch_size: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Patch rows in merge-block order and the (t, h, w) patch grid.

    frames: [T, C, H, W] with H and W multiples of patch·merge; T is padded to a multiple of the temporal
    patch by repeating the last frame (a still image, T = 1, is thus repeated over the temporal patch).
    Returns rows [t·h·w, C·temporal·patch·patch], ordered (t, h/merge, w/merge, merge_h, merge_w), each row
    laid out (C, temporal, patch_h, patch_w).
    """
    frames_count, channels, height, width = frames.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frame size {height}×{width} is not a multiple of patch·merge = {patch_size * merge_size}")
    if pad := -frames_count % temporal_patch_size:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    grid_t = frames.shape[0] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    # [gt, tp, C, gh/m, m, P, gw/m, m, P]
    blocks = frames.reshape(grid_t, temporal_patch_size, channels, grid_h // merge_size, merge_size, patch_size,
                            grid_w // merge_size, merge_size, patch_size)
    # -> [gt, gh/m, gw/m, m, m, C, tp, P, P]
    blocks = blocks.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = blocks.reshape(grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return rows, (grid_t, grid_h, grid_w)
