"""KV cache stored as int8 with one fp32 scale per (batch, head, position); dequantised when read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from qvl_pipeline.slots import Fidelity, NoOptions, RunFacts
from qvl_pipeline.slots.kv_cache import CacheShape, Int8Rows, KVCache, KVCacheBackend, check_devices, dtype_name
from qvl_plugins.kernels.native_gemv import (
    NativeBuild,
    int8_rows_quantize,
    int8_rows_widen,
    native_dtype_ok,
    native_for,
)
from qvl_plugins.kv_cache.capacity import check_capacity
from qvl_plugins.kv_cache.static import grown

SCALE_BYTES = 4          # one fp32 scale per (batch, head, position) row of keys and of values


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (int8 [..., d], fp32 scale [..., 1]), symmetric over the last dim: x ≈ q · scale."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(xf / scale).clamp_(-127, 127).to(torch.int8), scale


def store_rows(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, native: NativeBuild | None) -> None:
    """x [b, h, n, d] quantised per row (quantize_rows) into the cache slots q [b, h, n, d] int8 and scale
    [b, h, n, 1] fp32: on the CPU in one native call where the library is built (bit-equal), else in torch."""
    if native is not None and x.device.type == "cpu" and native_dtype_ok(x.dtype) and q.device.type == "cpu":
        int8_rows_quantize(native, x, q, scale)
    else:
        q[...], scale[...] = quantize_rows(x)


def read_back(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, native: NativeBuild | None) -> torch.Tensor:
    """Cached int8 rows q [b, h, n, d] with their scales [b, h, n, 1] -> (q · scale) in dtype [b, h, n, d]: on the CPU
    in one native pass where the library is built (bit-equal; torch's mixed-dtype multiply and cast cost ~7 ms a
    2B decode step at 250 cached positions on the 2-core VM), else in torch."""
    if native is not None and q.device.type == "cpu" and native_dtype_ok(dtype):
        return int8_rows_widen(native, q, scale, dtype)
    return (q * scale).to(dtype)


class Int8KVCacheStore(KVCache):
    """Preallocated int8 buffers [batch, kv_heads, max_len, d] plus scales [batch, kv_heads, max_len, 1]; read back
    through the native library `native` where given."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str],
                 native: NativeBuild | None = None) -> None:
        check_devices(shape, devices)
        self.shape, self.dtype = shape, dtype
        self.native = native
        size = (shape.batch, shape.kv_heads, shape.max_len, shape.head_dim)
        scale_size = (shape.batch, shape.kv_heads, shape.max_len, 1)
        self.keys = [torch.zeros(size, dtype=torch.int8, device=device) for device in devices]
        self.values = [torch.zeros(size, dtype=torch.int8, device=device) for device in devices]
        self.key_scales = [torch.zeros(scale_size, device=device) for device in devices]
        self.value_scales = [torch.zeros(scale_size, device=device) for device in devices]
        self.length = 0

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.append_int8(layer, k, v)
        return keys.dequantize(), values.dequantize()                # [batch, kv_heads, end, d] in dtype

    def append_int8(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[Int8Rows, Int8Rows]:
        start, end = self.length, self.length + k.shape[2]
        check_capacity(self.shape.max_len, end)
        for x, q, scale in ((k, self.keys[layer], self.key_scales[layer]),
                            (v, self.values[layer], self.value_scales[layer])):
            store_rows(x, q[:, :, start:end], scale[:, :, start:end], self.native)
        return (Int8Rows(self.keys[layer][:, :, :end], self.key_scales[layer][:, :, :end], self.dtype, self._widen),
                Int8Rows(self.values[layer][:, :, :end], self.value_scales[layer][:, :, :end], self.dtype,
                         self._widen))

    def _widen(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return read_back(q, scale, dtype, self.native)

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

    def __init__(self, facts: RunFacts, options: NoOptions | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        build = native_for(facts)
        self._native = build if build.available else None

    def create(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> KVCache:
        return Int8KVCacheStore(shape, dtype, devices, self._native)

    def storage(self, dtype: torch.dtype) -> str:
        return f"keys/values in int8 with one fp32 scale per (token, head), read back as {dtype_name(dtype)}"

    def bytes_per_position(self, shape: CacheShape, dtype: torch.dtype) -> int:
        return 2 * shape.layers * shape.batch * shape.kv_heads * (shape.head_dim + SCALE_BYTES)
