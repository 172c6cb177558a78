"""Save a state dict as a Hugging Face checkpoint folder: config.json plus safetensors shards and their index."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from qvl_pipeline.checkpoint.config import ties_word_embeddings
from qvl_pipeline.checkpoint.files import CONFIG_FILE, INDEX_FILE, SINGLE_FILE
from qvl_pipeline.checkpoint.reader import HEAD

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB", "500MB", "2GiB" (KB/MB/GB are powers of ten)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", size.upper())
    if not match:
        raise ValueError(f"cannot read {size!r} as a size; write it like '2GB' or '500MB'")
    return int(float(match.group(1)) * _UNITS[match.group(2) or ""])


def _plan_shards(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, split greedily so no shard passes `max_bytes` (a larger tensor gets a shard alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _storable(state: Mapping[str, torch.Tensor], drop: set[str]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies where needed (safetensors refuses tensors sharing storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in state.items():
        if name in drop:
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


def save_checkpoint(folder: str | Path, state: Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None,
                    *, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write `state` (and `config` as config.json) into `folder` in the Hugging Face layout; return the files.

    One shard is `model.safetensors`; several are `model-0000i-of-0000n.safetensors` with
    `model.safetensors.index.json`. With `tie_word_embeddings` set, `lm_head.weight` is not stored.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if config is not None:
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        written.append(out / CONFIG_FILE)
    drop = {HEAD} if config is not None and ties_word_embeddings(config) else set()
    tensors = _storable(state, drop)
    shards = _plan_shards(tensors, parse_size(max_shard_size))
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_FILE), metadata=metadata)
        return [*written, out / SINGLE_FILE]
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, name))
        written.append(out / name)
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                     "total_parameters": sum(t.numel() for t in tensors.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*written, out / INDEX_FILE]
