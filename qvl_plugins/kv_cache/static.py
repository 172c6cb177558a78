"""Reference KV cache: one preallocated [batch, kv_heads, max_len, head_dim] buffer pair per layer."""

from __future__ import annotations

import torch

from qvl_pipeline.slots.base import Fidelity
from qvl_pipeline.slots.kv_cache import CacheShape, ContextOverflowError, KVCache, KVCacheBackend


class StaticKVCache(KVCache):
    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str) -> None:
        self.shape = shape
        size = (shape.batch, shape.kv_heads, shape.max_len, shape.head_dim)
        self.keys = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.values = [torch.zeros(size, dtype=dtype, device=device) for _ in range(shape.layers)]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        new = k.shape[2]
        end = self.length + new
        if end > self.shape.max_len:
            raise ContextOverflowError(
                f"the KV cache holds {self.shape.max_len} positions but this step needs {end}; "
                f"raise generate.max_context or shorten the prompt/max_new_tokens")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, n: int) -> None:
        self.length = min(self.length, n)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


class StaticCache(KVCacheBackend):
    fidelity = Fidelity.REFERENCE
    summary = "preallocated per-layer buffers in the compute dtype, the reference"

    def create(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        return StaticKVCache(shape, dtype, device)
