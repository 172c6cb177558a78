"""KV cache stored as int8 with one fp32 scale per (batch, head, position); dequantised when read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.kv_cache import CacheShape, KVCache, KVCacheBackend, check_devices, dtype_name
from qvl_plugins.kv_cache.capacity import check_capacity
from qvl_plugins.kv_cache.static import grown

SCALE_BYTES = 4          # one fp32 scale per (batch, head, position) row of keys and of values


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (int8 [..., d], fp32 scale [..., 1]), symmetric over the last dim: x ≈ q · scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


class Int8KVCacheStore(KVCache):
    """Preallocated int8 buffers [batch, kv_heads, max_len, d] plus scales [batch, kv_heads, max_len, 1]."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> None:
        check_devices(shape, devices)
        self.shape, self.dtype = shape, dtype
        size = (shape.batch, shape.kv_heads, shape.max_len, shape.head_dim)
        scale_size = (shape.batch, shape.kv_heads, shape.max_len, 1)
        self.keys = [torch.zeros(size, dtype=torch.int8, device=device) for device in devices]
        self.values = [torch.zeros(size, dtype=torch.int8, device=device) for device in devices]
        self.key_scales = [torch.zeros(scale_size, device=device) for device in devices]
        self.value_scales = [torch.zeros(scale_size, device=device) for device in devices]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        check_capacity(self.shape.max_len, end)
        self.keys[layer][:, :, start:end], self.key_scales[layer][:, :, start:end] = quantize_rows(k)
        self.values[layer][:, :, start:end], self.value_scales[layer][:, :, start:end] = quantize_rows(v)
        keys = (self.keys[layer][:, :, :end] * self.key_scales[layer][:, :, :end]).to(self.dtype)
        values = (self.values[layer][:, :, :end] * self.value_scales[layer][:, :, :end]).to(self.dtype)
        return keys, values                                          # [batch, kv_heads, end, d] in dtype

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def grow(self, max_len: int) -> None:
        if max_len <= self.shape.max_len:
            return
        for buffers in (self.keys, self.values, self.key_scales, self.value_scales):
            buffers[:] = [grown(t, max_len, self.length) for t in buffers]
        self.shape = replace(self.shape, max_len=max_len)

    def relocate(self, devices: Sequence[torch.device | str]) -> None:
        check_devices(self.shape, devices)
        for buffers in (self.keys, self.values, self.key_scales, self.value_scales):
            buffers[:] = [t.to(device) for t, device in zip(buffers, devices, strict=True)]

    def nbytes(self) -> int:
        tensors = self.keys + self.values + self.key_scales + self.value_scales
        return sum(t.numel() * t.element_size() for t in tensors)


class Int8KVCache(KVCacheBackend):
    fidelity = Fidelity.APPROXIMATE
    summary = ("keys/values stored int8 with a fp32 scale per (token, head), dequantised on read: ~¼ of fp32 "
               "(½ of bf16) cache memory for long contexts at ~1% relative error")

    def create(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> KVCache:
        return Int8KVCacheStore(shape, dtype, devices)

    def storage(self, dtype: torch.dtype) -> str:
        return f"keys/values in int8 with one fp32 scale per (token, head), read back as {dtype_name(dtype)}"

    def bytes_per_position(self, shape: CacheShape, dtype: torch.dtype) -> int:
        return 2 * shape.layers * shape.batch * shape.kv_heads * (shape.head_dim + SCALE_BYTES)
