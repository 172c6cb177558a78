"""Tensors of a safetensors file as views of one memory mapping, made from its checked header without reading any
tensor's data."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qvl_pipeline.checkpoint.header import ShardHeader, TensorInfo


def map_tensors(shard: ShardHeader, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """The named tensors of `shard` (all when `names` is None), each a view of a private mapping of the file (the
    file itself is never written); OSError when it cannot be mapped.

    Nothing is read until a tensor is used. safetensors' own `get_tensor` touches each tensor it returns, and the
    kernel's read-ahead around that page (8 MiB on the dev VM's disk) reads most of a file nobody computes with: a
    quantised run never uses the checkpoint's float linears, yet loading them that way read ~2 GB of the cold 2B
    checkpoint (2.3 s on the dev VM)."""
    storage = torch.UntypedStorage.from_file(str(shard.path), shared=False, nbytes=shard.file_bytes)
    return {name: tensor_view(storage, shard.tensors[name]) for name in (shard.tensors if names is None else names)}


def tensor_view(storage: torch.UntypedStorage, info: TensorInfo) -> torch.Tensor:
    """The tensor `info` describes inside `storage` (the whole file): a view, or a copy where its data is not aligned
    to its element size (a view of it would be misaligned)."""
    dtype = info.torch_dtype
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype)
    if info.offset % dtype.itemsize:
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, info.offset, (info.nbytes,), (1,))
        return raw.clone().view(dtype).reshape(info.shape)
    return torch.empty(0, dtype=dtype).set_(storage, info.offset // dtype.itemsize, info.shape)   # row-major
