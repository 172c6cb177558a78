"""KV cache whose per-layer buffers start small and double when full, up to the shape's max_len."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from qvl_pipeline.slots import Fidelity, Plugin
from qvl_pipeline.slots.checks import check_kv_cache
from qvl_pipeline.slots.kv_cache import CacheShape, KVCache, KVCacheBackend, check_devices, dtype_name
from qvl_plugins.kv_cache.capacity import check_capacity


class DynamicKVCache(KVCache):
    """Same contract as the static cache; memory follows the longest context seen, not max_len."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str],
                 initial_len: int) -> None:
        check_devices(shape, devices)
        self.shape, self.dtype, self.devices = shape, dtype, tuple(torch.device(d) for d in devices)
        self.initial_len = initial_len
        self.keys: list[torch.Tensor | None] = [None] * shape.layers     # each [batch, kv_heads, capacity, d]
        self.values: list[torch.Tensor | None] = [None] * shape.layers
        self.length = 0

    def _grow(self, layer: int, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reallocate `layer`'s buffers to max(needed, 2 × capacity, initial_len) ≤ max_len positions,
        keeping the committed positions."""
        old_k, old_v = self.keys[layer], self.values[layer]
        capacity = 0 if old_k is None else old_k.shape[2]
        capacity = min(self.shape.max_len, max(needed, 2 * capacity, self.initial_len))
        size = (self.shape.batch, self.shape.kv_heads, capacity, self.shape.head_dim)
        new_k = torch.empty(size, dtype=self.dtype, device=self.devices[layer])
        new_v = torch.empty(size, dtype=self.dtype, device=self.devices[layer])
        if old_k is not None and old_v is not None:
            new_k[:, :, :self.length] = old_k[:, :, :self.length]
            new_v[:, :, :self.length] = old_v[:, :, :self.length]
        self.keys[layer], self.values[layer] = new_k, new_v
        return new_k, new_v

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        check_capacity(self.shape.max_len, end)
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or keys.shape[2] < end:
            keys, values = self._grow(layer, end)
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def grow(self, max_len: int) -> None:
        """Raise the limit; buffers keep doubling on demand up to it."""
        if max_len > self.shape.max_len:
            self.shape = replace(self.shape, max_len=max_len)

    def relocate(self, devices: Sequence[torch.device | str]) -> None:
        check_devices(self.shape, devices)
        self.devices = tuple(torch.device(d) for d in devices)
        self.keys = [None if t is None else t.to(d) for t, d in zip(self.keys, self.devices, strict=True)]
        self.values = [None if t is None else t.to(d) for t, d in zip(self.values, self.devices, strict=True)]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)


@dataclass(frozen=True)
class DynamicOptions:
    initial_len: int = 256         # positions allocated at the first append, doubled when full

    def __post_init__(self) -> None:
        if self.initial_len < 1:
            raise ValueError(f"initial_len must be a positive position count, got {self.initial_len}")


class DynamicCache(KVCacheBackend):
    fidelity = Fidelity.EXACT
    summary = ("per-layer buffers that grow by doubling up to max_len: memory follows the real context; "
               "wins for short requests under a long max_context")
    Options = DynamicOptions

    def create(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> KVCache:
        return DynamicKVCache(shape, dtype, devices, self.options.initial_len)

    def storage(self, dtype: torch.dtype) -> str:
        return f"keys/values in {dtype_name(dtype)}, buffers doubled on demand from {self.options.initial_len} slots"

    def self_test(self, reference: Plugin) -> None:
        check_kv_cache(self, reference)
        # The configured initial_len outlasts the tiny script: also run it growing from a single position.
        check_kv_cache(type(self)(self.facts, DynamicOptions(initial_len=1), name=self.name), reference)
