"""Reference KV cache: one preallocated [batch, kv_heads, max_len, head_dim] buffer pair per layer, each on its
layer's device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.kv_cache import CacheShape, KVCache, KVCacheBackend, check_devices
from qvl_plugins.kv_cache.capacity import check_capacity


def grown(buffer: torch.Tensor, max_len: int, keep: int) -> torch.Tensor:
    """A [b, h, max_len, ...] copy of `buffer` [b, h, old, ...] keeping its first `keep` positions (pure)."""
    size = (*buffer.shape[:2], max_len, *buffer.shape[3:])
    out = torch.zeros(size, dtype=buffer.dtype, device=buffer.device)
    out[:, :, :keep] = buffer[:, :, :keep]
    return out


class StaticKVCache(KVCache):
    def __init__(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> None:
        check_devices(shape, devices)
        self.shape = shape
        size = (shape.batch, shape.kv_heads, shape.max_len, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for device in devices]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for device in devices]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        check_capacity(self.shape.max_len, end)
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def grow(self, max_len: int) -> None:
        if max_len <= self.shape.max_len:
            return
        self.keys = [grown(t, max_len, self.length) for t in self.keys]
        self.values = [grown(t, max_len, self.length) for t in self.values]
        self.shape = replace(self.shape, max_len=max_len)

    def relocate(self, devices: Sequence[torch.device | str]) -> None:
        check_devices(self.shape, devices)
        self.keys = [t.to(device) for t, device in zip(self.keys, devices, strict=True)]
        self.values = [t.to(device) for t, device in zip(self.values, devices, strict=True)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class StaticCache(KVCacheBackend):
    fidelity = Fidelity.REFERENCE
    summary = "preallocated per-layer buffers in the compute dtype on each layer's device, the reference"

    def create(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> KVCache:
        return StaticKVCache(shape, dtype, devices)
