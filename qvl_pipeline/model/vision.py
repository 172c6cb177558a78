"""Stage 1: the vision tower — patches of one or more images/videos -> visual tokens + deepstack features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qvl_pipeline.errors import InputError
from qvl_pipeline.model.config import VisionConfig
from qvl_pipeline.model.embedding import lookup_table
from qvl_pipeline.model.positions import pos_embed_taps, vision_cu_seqlens, vision_rotary_positions
from qvl_pipeline.model.vision_blocks import PatchEmbed, PatchMerger, VisionBlock
from qvl_pipeline.slots import AttentionBackend, KernelsBackend, RotaryBackend


@dataclass
class VisionOutput:
    """Visual tokens of a batch of images (or video frames), concatenated in input order.

    embeds: [tokens, out_hidden]; deepstack: one [tokens, out_hidden] per deepstack tap (decoder layer k
    gets deepstack[k]); grid_thw: [n, 3] the patch grids they came from.
    """

    embeds: torch.Tensor
    deepstack: list[torch.Tensor]
    grid_thw: torch.Tensor

    def token_counts(self, merge_unit: int) -> list[int]:
        """Visual tokens per image/video."""
        return [t * h * w // merge_unit for t, h, w in self.grid_thw.tolist()]


def vision_inv_freq(cfg: VisionConfig) -> torch.Tensor:
    """[head_dim / 4] fp32 frequencies of the 2D rotary (the same for rows and columns)."""
    quarter = cfg.head_dim // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, quarter, 2, dtype=torch.float, device="cpu") / quarter))


def check_vision_input(cfg: VisionConfig, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> None:
    """Raise InputError unless pixel_values [sum t·h·w, C·T·P·P] and grid_thw [n, 3] agree with each other and
    with the config (h, w divisible by the merge size)."""
    if grid_thw.dim() != 2 or grid_thw.shape[-1] != 3 or grid_thw.shape[0] == 0:
        raise InputError(f"grid_thw must have shape [images, 3], got {list(grid_thw.shape)}",
                         "pass the processor's image_grid_thw / video_grid_thw")
    if grid_thw.is_floating_point() or bool((grid_thw <= 0).any()):
        raise InputError(f"grid_thw must hold positive integers, got {grid_thw.tolist()}")
    m = cfg.spatial_merge_size
    for i, (_, h, w) in enumerate(grid_thw.tolist()):
        if h % m or w % m:
            raise InputError(f"grid {i} is {h}×{w} patches, not divisible by the spatial merge size {m}",
                             f"resize images to multiples of patch_size·merge = {cfg.patch_size * m} px")
    patches = int(grid_thw.prod(-1).sum())
    expected = [patches, cfg.patch_dim]
    if pixel_values.dim() != 2 or list(pixel_values.shape) != expected:
        raise InputError(
            f"pixel_values has shape {list(pixel_values.shape)} but the grids {grid_thw.tolist()} need "
            f"{expected} ({patches} patches of {cfg.in_channels}·{cfg.temporal_patch_size}·"
            f"{cfg.patch_size}·{cfg.patch_size} values)",
            "pass the processor's pixel_values with the matching grid_thw, and use the checkpoint's "
            "preprocessor settings (patch size, temporal patch)")


class VisionTower(nn.Module):
    """pixel_values [patches, C·T·P·P] + grid_thw [n, 3] -> VisionOutput (merged tokens + deepstack)."""

    def __init__(self, cfg: VisionConfig, *, attention: AttentionBackend, rotary: RotaryBackend,
                 kernels: KernelsBackend) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = lookup_table(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg, attention, rotary, kernels) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, kernels, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, kernels, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)
        self._rotary = rotary
        self._inv_freq = vision_inv_freq(cfg)      # plain tensor: never cast with the weights
        self._taps = {layer: k for k, layer in enumerate(cfg.deepstack_visual_indexes)}

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionOutput:
        check_vision_input(self.cfg, pixel_values, grid_thw)
        grid_cpu = grid_thw.cpu()
        device = self.pos_embed.weight.device
        merge = self.cfg.spatial_merge_size

        x = self.patch_embed(pixel_values.to(device))                               # [patches, hidden]
        idx, wts = pos_embed_taps(grid_cpu, self.cfg.grid_side, merge)              # [patches, 4] each
        pos = (self.pos_embed(idx.to(device)) * wts.to(device)[:, :, None]).sum(1)  # [patches, hidden]
        x = x + pos.to(x.dtype)

        hw = vision_rotary_positions(grid_cpu, merge).to(device)                     # [patches, 2]
        cos, sin = self._rotary.vision_tables(hw, self._inv_freq.to(device))        # [patches, d]
        cos, sin = cos[:, None], sin[:, None]                                        # [patches, 1, d]
        cu_seqlens = vision_cu_seqlens(grid_cpu).to(device)

        deepstack: list[torch.Tensor] = []
        for layer, block in enumerate(self.blocks):
            x = block(x, cu_seqlens, cos, sin)
            k = self._taps.get(layer)
            if k is not None:
                deepstack.append(self.deepstack_merger_list[k](x))                  # [tokens, out_hidden]
        return VisionOutput(embeds=self.merger(x), deepstack=deepstack, grid_thw=grid_cpu)
