"""Index maths, as pure functions: MRoPE position ids, rope deltas, vision rotary ids, pos-embed taps.

Token types: 0 text, 1 image placeholder, 2 video placeholder.
"""

from __future__ import annotations

from itertools import groupby

import torch

from qvl_pipeline.errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2


# ---- decoder (MRoPE) -------------------------------------------------------------------------------------
def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """input_ids [b, s] -> [b, s] int64 (0 text, 1 image placeholder, 2 video placeholder)."""
    types = torch.zeros_like(input_ids, dtype=torch.long)
    types[input_ids == image_token_id] = IMAGE
    types[input_ids == video_token_id] = VIDEO
    return types


def split_video_grids(video_grid_thw: torch.Tensor) -> torch.Tensor:
    """[videos, 3] -> [frames, 3] with t = 1: each temporal patch of a video is its own placeholder run
    (the prompt puts a timestamp between frames)."""
    grids = torch.repeat_interleave(video_grid_thw, video_grid_thw[:, 0], dim=0)
    grids[:, 0] = 1
    return grids


def visual_run_positions(start: int, grid: tuple[int, int, int], merge: int) -> torch.Tensor:
    """One placeholder run's [3, t·(h/m)·(w/m)] positions: T = start + frame, H = start + row, W = start + col
    over the merged grid, row-major."""
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tt = torch.arange(t)[:, None, None].expand(t, h, w)
    hh = torch.arange(h)[None, :, None].expand(t, h, w)
    ww = torch.arange(w)[None, None, :].expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + start


def runs(types_row: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of equal token type: [(type, start, end)]."""
    out, pos = [], 0
    for kind, group in groupby(types_row):
        n = len(list(group))
        out.append((kind, pos, pos + n))
        pos += n
    return out


def mrope_position_ids(types: torch.Tensor, image_grid_thw: torch.Tensor | None,
                       video_grid_thw: torch.Tensor | None, merge: int,
                       max_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill positions for a batch of prompts.

    types [b, s] (see token_types); image_grid_thw [images, 3]; video_grid_thw [videos, 3] (patch grids,
    before merging). Grids are consumed in order across the batch rows, one per placeholder run (one per
    video frame). A text run advances all three rows together; a visual run starts at the current position
    and the position then advances by max(h, w) / merge.
    Returns (position_ids [3, b, s] int64, rope_delta [b] int64 = max position + 1 − s).
    """
    b, s = types.shape
    queues = {
        IMAGE: [tuple(g) for g in image_grid_thw.tolist()] if image_grid_thw is not None else [],
        VIDEO: [tuple(g) for g in split_video_grids(video_grid_thw).tolist()] if video_grid_thw is not None else [],
    }
    used = {IMAGE: 0, VIDEO: 0}
    names = {IMAGE: "image", VIDEO: "video frame"}
    position_ids = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    for row, types_row in enumerate(types.tolist()):
        pieces, current = [], 0
        for kind, start, end in runs(types_row):
            if kind == TEXT:
                pieces.append(torch.arange(current, current + end - start).expand(3, -1))
                current += end - start
                continue
            if used[kind] >= len(queues[kind]):
                raise InputError(
                    f"the prompt has more {names[kind]} placeholder runs than {names[kind]} grids "
                    f"({len(queues[kind])} given)",
                    "pass one grid per image (and per video), in prompt order")
            grid = queues[kind][used[kind]]
            used[kind] += 1
            expected = grid[0] * (grid[1] // merge) * (grid[2] // merge)
            if end - start != expected:
                raise InputError(
                    f"{names[kind]} placeholder run at tokens {start}..{end - 1} has {end - start} tokens but its "
                    f"grid {list(grid)} needs {expected}",
                    "build the prompt from the processor's grid: t·h·w / merge² placeholders per image/frame, "
                    "each run wrapped in vision_start/vision_end")
            pieces.append(visual_run_positions(current, grid, merge))
            current += max(grid[1], grid[2]) // merge
        positions = torch.cat(pieces, dim=1)           # [3, s]
        position_ids[:, row] = positions
        deltas[row] = int(positions.max()) + 1 - s
    for kind, queue in queues.items():
        if used[kind] != len(queue):
            raise InputError(
                f"{len(queue)} {names[kind]} grids were given but the prompt has {used[kind]} "
                f"{names[kind]} placeholder runs",
                "add one placeholder run per image/frame to the prompt, or drop the extra images")
    if max_positions is not None:
        check_positions(int(position_ids.max()) if s else 0, max_positions)
    return position_ids, deltas


def text_position_ids(batch: int, seq: int, start: int = 0) -> torch.Tensor:
    """Positions of a text-only prompt: [3, b, s] = start .. start + s − 1 on every row."""
    return torch.arange(start, start + seq).expand(3, batch, seq).clone()


def decode_position_ids(cache_length: int, rope_delta: torch.Tensor, new_tokens: int = 1,
                        max_positions: int | None = None) -> torch.Tensor:
    """Positions of the next `new_tokens` tokens after `cache_length` cached ones: [3, b, new] =
    cache_length + i + rope_delta[b] on all three rows."""
    base = torch.arange(cache_length, cache_length + new_tokens)            # [new]
    pos = base[None, :] + rope_delta.to("cpu", torch.long)[:, None]          # [b, new]
    if max_positions is not None:
        check_positions(int(pos.max()), max_positions)
    return pos[None].expand(3, -1, -1).clone()


def check_positions(max_position: int, max_positions: int) -> None:
    """Raise InputError when a rotary position reaches max_position_embeddings."""
    if max_position >= max_positions:
        raise InputError(
            f"position {max_position} is beyond the model's max_position_embeddings={max_positions}",
            "shorten the prompt, lower max_new_tokens, or use fewer/smaller images")


# ---- vision tower -----------------------------------------------------------------------------------------
def merge_block_order(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) [h·w] of each patch of an h×w grid listed in merge-block order
    (block row, block col, row in block, col in block) — the order of `pixel_values`."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    return rows.reshape(shape).transpose(1, 2).flatten(), cols.reshape(shape).transpose(1, 2).flatten()


def vision_rotary_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """grid_thw [n, 3] -> [patches, 2] (row, col) of every patch, frames repeated, in merge-block order."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = merge_block_order(h, w, merge)
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out, dim=0)


def vision_cu_seqlens(grid_thw: torch.Tensor) -> torch.Tensor:
    """grid_thw [n, 3] -> [frames + 1] int32 offsets: attention is bidirectional within one frame only."""
    lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    return torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0).to(torch.int32)


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align-corners) taps [n, 2] and weights [n, 2] of positions `index` on an axis of `size`
    points resampled from a `side`-point table."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    low = torch.floor(src)
    offsets = torch.arange(2)
    taps = (low.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - low[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def pos_embed_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling of the side×side learned position grid onto each image's patch grid.

    Returns (indices [patches, 4] into the flattened table, weights [patches, 4] fp32), patches in
    merge-block order, frames repeated.
    """
    all_idx, all_w = [], []
    for t, h, w in grid_thw.tolist():
        rows, cols = merge_block_order(h, w, merge)
        r_taps, r_w = _axis_taps(rows, h, side)
        c_taps, c_w = _axis_taps(cols, w, side)
        idx = (r_taps[:, :, None] * side + c_taps[:, None, :]).reshape(-1, 4)     # [h·w, 4]
        wts = (r_w[:, :, None] * c_w[:, None, :]).reshape(-1, 4)
        all_idx.append(idx.repeat(t, 1))
        all_w.append(wts.repeat(t, 1))
    return torch.cat(all_idx), torch.cat(all_w)
