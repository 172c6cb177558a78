"""The KV-cache slot: per-layer key/value storage for autoregressive decoding, on each layer's device."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from qvl_pipeline.facts import KVFacts, RunFacts
from qvl_pipeline.slots.base import Plugin


class ContextOverflowError(ValueError):
    """A request needs more positions than the cache (or the model) holds."""


@dataclass(frozen=True)
class CacheShape:
    layers: int
    batch: int
    kv_heads: int
    head_dim: int
    max_len: int          # positions the cache holds now (grow() raises it)


@dataclass(frozen=True)
class Int8Rows:
    """A layer's cached keys or values kept as int8 rows, x ≈ q · scale, read in `dtype`.

    q [batch, kv_heads, n, head_dim] int8; scale [batch, kv_heads, n, 1] fp32; `widen(q, scale, dtype)` is the
    cache's own read-back, so `dequantize()` is what `append` returns."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    widen: Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]

    def dequantize(self) -> torch.Tensor:
        return self.widen(self.q, self.scale, self.dtype)


class KVCache:
    """One request's cache. `append` stores new keys/values for a layer and returns all keys/values so far.

    k, v in: [batch, kv_heads, new, head_dim]; out: [batch, kv_heads, length + new, head_dim], on the layer's
    device. `length` counts positions already committed; `advance(n)` commits n positions after every layer has
    appended them; `truncate(n)` forgets everything after position n (multi-turn edits, retries); `grow(n)`
    makes room for n positions keeping what is committed (a chat that outgrows its first size).
    """

    length: int
    shape: CacheShape

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def append_int8(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[Int8Rows, Int8Rows] | None:
        """As `append` for a cache that stores int8 rows, returning them unwidened (AttentionBackend.attend_int8
        reads them); None, appending nothing, for any other cache (the default)."""
        return None

    def advance(self, n: int) -> None:
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        raise NotImplementedError

    def grow(self, max_len: int) -> None:
        raise NotImplementedError

    def relocate(self, devices: Sequence[torch.device | str]) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


def check_devices(shape: CacheShape, devices: Sequence[torch.device | str]) -> None:
    """One device per layer, or a ValueError naming both counts."""
    if len(devices) != shape.layers:
        raise ValueError(f"a KV cache of {shape.layers} layers needs one device per layer, got {len(devices)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class KVCacheBackend(Plugin):
    """Creates KVCache objects for requests; layer i's buffers live on devices[i]."""

    slot = "kv_cache"
    reference = "static"

    def create(self, shape: CacheShape, dtype: torch.dtype, devices: Sequence[torch.device | str]) -> KVCache:
        raise NotImplementedError

    def storage(self, dtype: torch.dtype) -> str:
        """How keys and values are stored for a model computing in `dtype` (the plan states it)."""
        return f"keys/values in {dtype_name(dtype)}"

    def bytes_per_position(self, shape: CacheShape, dtype: torch.dtype) -> int:
        """Bytes one position takes in every layer (keys and values) at `shape.batch` sequences."""
        return 2 * shape.layers * shape.batch * shape.kv_heads * shape.head_dim * dtype.itemsize

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_kv_cache

        check_kv_cache(self, reference)


def planned_kv(backend: KVCacheBackend, facts: RunFacts) -> KVFacts:
    """The run's KV cache as `backend` will store it, known before anything is loaded: keys/values computed in the
    model's activation dtype (`facts.activation_dtype`: set `facts.weights` first) and `backend.bytes_per_position`
    for one sequence — the one figure the context budget, the memory plan and the plan's kv line use."""
    text = facts.model.config.text
    shape = CacheShape(layers=text.num_hidden_layers, batch=1, kv_heads=text.num_key_value_heads,
                       head_dim=text.head_dim, max_len=facts.context.positions)
    dtype = facts.activation_dtype
    return KVFacts(dtype, backend.bytes_per_position(shape, getattr(torch, dtype)))
