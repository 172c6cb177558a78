"""The KV-cache slot: per-layer key/value storage for autoregressive decoding."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl_pipeline.slots.base import Plugin


class ContextOverflowError(ValueError):
    """A request needs more positions than the cache (or the model) holds."""


@dataclass(frozen=True)
class CacheShape:
    layers: int
    batch: int
    kv_heads: int
    head_dim: int
    max_len: int          # positions the cache can hold


class KVCache:
    """One request's cache. `append` stores new keys/values for a layer and returns all keys/values so far.

    k, v in: [batch, kv_heads, new, head_dim]; out: [batch, kv_heads, length + new, head_dim].
    `length` counts positions already committed; `advance(n)` commits n positions after every layer has
    appended them; `truncate(n)` forgets everything after position n (multi-turn edits, retries).
    """

    length: int

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def advance(self, n: int) -> None:
        raise NotImplementedError

    def truncate(self, n: int) -> None:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class KVCacheBackend(Plugin):
    """Creates KVCache objects for requests."""

    slot = "kv_cache"

    def create(self, shape: CacheShape, dtype: torch.dtype, device: torch.device | str) -> KVCache:
        raise NotImplementedError
