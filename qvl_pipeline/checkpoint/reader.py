"""Load a Hugging Face checkpoint folder into a module whose state-dict names are the checkpoint's names."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from qvl_pipeline.checkpoint.config import read_config, resolve_dtype, ties_word_embeddings
from qvl_pipeline.checkpoint.files import WeightFiles, find_weight_files
from qvl_pipeline.checkpoint.mapping import map_tensors
from qvl_pipeline.errors import CheckpointError

HEAD = "lm_head.weight"
EMBEDDING = "model.language_model.embed_tokens.weight"
_SHOWN = 5   # names listed per kind of problem


@dataclass(frozen=True)
class LoadReport:
    """What a load did: files read, tensors and bytes loaded, time taken, the weights' dtype."""

    files: tuple[str, ...]
    tensors: int
    bytes: int
    seconds: float
    dtype: torch.dtype | None
    tied: tuple[str, ...] = ()     # names that now share another tensor's storage
    converted: int = 0             # tensors copied to change dtype or device (the rest are memory-mapped)

    def __str__(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.") if self.dtype else "stored dtypes"
        return (f"loaded {self.tensors} tensors ({self.bytes / 2**20:.1f} MiB) from {len(self.files)} file(s) "
                f"in {self.seconds:.2f} s as {dtype}")


def _listing(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return ", ".join(names[:_SHOWN]) + more


def _embedding_name(expected: Mapping[str, torch.Tensor], module: nn.Module) -> str:
    if EMBEDDING in expected:
        return EMBEDDING
    candidates = sorted(n for n in expected if n.endswith("embed_tokens.weight"))
    if candidates:
        return candidates[0]
    get_embeddings = getattr(module, "get_input_embeddings", None)
    if callable(get_embeddings):
        weight = get_embeddings().weight
        for name, param in module.named_parameters():
            if param is weight:
                return name
    raise CheckpointError("config.json ties the output head to the input embedding, but the model has no "
                          "`embed_tokens` embedding to tie it to",
                          "set tie_word_embeddings to false in config.json, or store lm_head.weight")


def _check_names(files: WeightFiles, expected: Mapping[str, torch.Tensor], skip: set[str]) -> None:
    """Raise one CheckpointError naming every missing, unexpected, mis-shaped or mis-typed tensor."""
    missing = sorted(n for n in expected if n not in files.location and n not in skip)
    unexpected = sorted(n for n in files.location if n not in expected)
    mis_shaped = sorted(n for n in files.location
                        if n in expected and files.tensors[n].shape != tuple(expected[n].shape))
    mis_typed = files.dtype_problems(expected)
    problems, hints = [], []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing from the checkpoint: {_listing(missing)}")
        hints.append("download the complete checkpoint (a shard may be absent), and check that config.json "
                     "belongs to these weights")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) in the checkpoint: {_listing(unexpected)}")
        hints.append("the weights are for another architecture or size than config.json describes: "
                     "restore the model's own config.json")
    for name in mis_shaped[:_SHOWN]:
        problems.append(f"tensor {name} has shape {list(files.tensors[name].shape)} in the checkpoint but "
                        f"the model built from config.json expects {list(expected[name].shape)}")
    if len(mis_shaped) > _SHOWN:
        problems.append(f"... {len(mis_shaped) - _SHOWN} more shape mismatches")
    if mis_shaped:
        hints.append("config.json and the weights disagree on the model's sizes: use the config.json that came "
                     "with these weights")
    problems.extend(mis_typed[:_SHOWN])
    if len(mis_typed) > _SHOWN:
        problems.append(f"... {len(mis_typed) - _SHOWN} more dtype mismatches")
    if mis_typed:
        hints.append("the weights are stored in a format this loader does not convert (quantized or damaged): use "
                     "the model's original bfloat16/float16/float32 safetensors files")
    if problems:
        raise CheckpointError(f"checkpoint {files.folder} does not fit the model: " + "; ".join(problems),
                              "; ".join(hints))


def _prepare(tensor: torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """The tensor in the target dtype (floating tensors only) on the target device; as is when it matches."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device) if tensor.device != device else tensor


def _tie(module: nn.Module, head: str, embedding: str) -> None:
    owner_name, _, attr = head.rpartition(".")
    owner = module.get_submodule(owner_name)
    weight = module.get_parameter(embedding)
    if tuple(getattr(owner, attr).shape) != tuple(weight.shape):
        raise CheckpointError(f"cannot tie {head} {list(getattr(owner, attr).shape)} to {embedding} "
                              f"{list(weight.shape)}: their shapes differ",
                              "set tie_word_embeddings to false in config.json and store lm_head.weight")
    setattr(owner, attr, weight)


def load_checkpoint(folder: str | Path, module: nn.Module, *, dtype: str | torch.dtype | None = None,
                    device: str | torch.device = "cpu", progress: bool = True) -> LoadReport:
    """Fill every parameter and persistent buffer of `module` from the checkpoint in `folder`.

    Floating tensors take `dtype` (else the config's `dtype`/`torch_dtype`, else the stored dtype). A tensor
    already in the right dtype on the CPU is assigned memory-mapped, without a copy. Nothing is loaded unless
    every name and shape fits; a mismatch, a missing or damaged file raises CheckpointError.
    """
    start = time.perf_counter()
    config = read_config(folder)
    target = resolve_dtype(config, dtype)
    device = torch.device(device)
    files = find_weight_files(folder)
    expected = module.state_dict(keep_vars=True)

    tied = ties_word_embeddings(config) and HEAD in expected
    embedding = _embedding_name(expected, module) if tied else ""
    skip = {HEAD} if tied else set()
    _check_names(files, expected, skip)

    wanted = [n for n in files.location if n not in skip]
    total = sum(files.tensors[n].nbytes for n in wanted)
    converted, seen_dtype = 0, None
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"loading {files.folder.name}",
              file=sys.stderr, disable=not progress, leave=False) as bar:
        for shard in files.shards:
            names = [n for n in wanted if files.location[n] == shard.path]
            if not names:
                continue
            state: dict[str, torch.Tensor] = {}
            try:
                mapped = map_tensors(shard, names)
            except (OSError, RuntimeError) as exc:       # torch reports a file it cannot map as a RuntimeError
                raise CheckpointError(f"cannot read shard {shard.path}: {exc}",
                                      "the file is damaged or was only partly downloaded: download it again") from exc
            for name, stored in mapped.items():
                tensor = _prepare(stored, target, device)
                converted += tensor is not stored
                if seen_dtype is None and tensor.is_floating_point():
                    seen_dtype = tensor.dtype
                state[name] = tensor
                bar.update(files.tensors[name].nbytes)
            module.load_state_dict(state, strict=False, assign=True)
    if tied:
        _tie(module, HEAD, embedding)
    left_on_meta = [n for n, t in module.state_dict(keep_vars=True).items() if t.is_meta]
    if left_on_meta:
        raise CheckpointError(f"tensors still unset after loading: {_listing(left_on_meta)}",
                              "the model declares tensors the checkpoint format cannot fill: report this as a bug")
    return LoadReport(files=tuple(s.path.name for s in files.shards), tensors=len(wanted), bytes=total,
                      seconds=time.perf_counter() - start, dtype=target or seen_dtype,
                      tied=(HEAD,) if tied else (), converted=converted)
