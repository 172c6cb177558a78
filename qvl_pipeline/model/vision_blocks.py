"""Building blocks of the vision tower: patch embedding, ViT block (2D-rotary attention + MLP), patch merger."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.model.config import VisionConfig
from qvl_pipeline.slots import AttentionBackend, KernelsBackend, RotaryBackend


class PatchEmbed(nn.Module):
    """Flattened patches [patches, C·T·P·P] -> [patches, hidden]: the Conv3d with kernel = stride = (T, P, P),
    computed as the equivalent matmul. Holds the checkpoint's 5-D `proj.weight`."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # pixels: [patches, C·T·P·P] -> [patches, hidden]
        weight = self.proj.weight
        return F.linear(pixels.to(weight.dtype), weight.flatten(1), self.proj.bias)


class VisionAttention(nn.Module):
    """Fused-qkv attention with 2D rotary, bidirectional within each frame (cu_seqlens segments)."""

    def __init__(self, cfg: VisionConfig, attention: AttentionBackend, rotary: RotaryBackend,
                 kernels: KernelsBackend) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv = kernels.linear(cfg.hidden_size, 3 * cfg.hidden_size, True)
        self.proj = kernels.linear(cfg.hidden_size, cfg.hidden_size, True)
        self._attention = attention
        self._rotary = rotary

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        # x: [patches, hidden]; cos, sin: [patches, 1, head_dim] fp32
        n = x.shape[0]
        q, k, v = self.qkv(x).reshape(n, 3, self.heads, self.head_dim).unbind(1)   # each [patches, heads, d]
        q, k = self._rotary.apply(q, k, cos, sin, upcast=True)
        out = self._attention.attend_varlen(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                            cu_seqlens, scale=self.scale)        # [patches, heads, d]
        return self.proj(out.reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig, kernels: KernelsBackend) -> None:
        super().__init__()
        self.linear_fc1 = kernels.linear(cfg.hidden_size, cfg.intermediate_size, True)
        self.linear_fc2 = kernels.linear(cfg.intermediate_size, cfg.hidden_size, True)
        self._act = kernels.activation(cfg.hidden_act)        # on fc1's output, a temporary: may run in place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self._act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)); x + mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, attention: AttentionBackend, rotary: RotaryBackend,
                 kernels: KernelsBackend) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg, attention, rotary, kernels)
        self.mlp = VisionMLP(cfg, kernels)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        # x: [patches, hidden]
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """merge² neighbouring patches -> one token of the decoder's width.

    The final merger normalises each patch before grouping; a deepstack merger (`postshuffle_norm`)
    normalises the grouped vector.
    """

    def __init__(self, cfg: VisionConfig, kernels: KernelsBackend, postshuffle_norm: bool) -> None:
        super().__init__()
        self.grouped = cfg.hidden_size * cfg.merge_unit
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.grouped if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = kernels.linear(self.grouped, self.grouped, True)
        self.linear_fc2 = kernels.linear(self.grouped, cfg.out_hidden_size, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [patches, hidden] (merge-block order) -> [patches / merge², out_hidden]
        if self.postshuffle_norm:
            x = self.norm(x.reshape(-1, self.grouped))
        else:
            x = self.norm(x).reshape(-1, self.grouped)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))
