"""Which files of a checkpoint folder hold which tensors: `model.safetensors`, or shards and their index."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from qvl_pipeline.checkpoint.header import ShardHeader, TensorInfo, read_header
from qvl_pipeline.checkpoint.jsonfile import read_json
from qvl_pipeline.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
# Pickle-based weight files: loading them runs arbitrary code, so they are refused, never opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_CONVERT_HINT = (
    "convert the checkpoint to safetensors in an environment you trust (for example "
    "`model.save_pretrained(out_dir, safe_serialization=True)` with transformers), or download the "
    "*.safetensors version of the model"
)


@dataclass(frozen=True)
class WeightFiles:
    """The tensors of a checkpoint: where each one lives, and what its header says about it."""

    folder: Path
    shards: tuple[ShardHeader, ...]
    location: dict[str, Path]       # tensor name -> shard path
    tensors: dict[str, TensorInfo]  # tensor name -> dtype, shape, bytes

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for info in self.tensors.values())

    def dtype_problems(self, expected: Mapping[str, torch.Tensor]) -> list[str]:
        """One line per stored tensor whose dtype cannot fill the model's tensor of that name (integers for a
        floating weight, another dtype for an integer buffer); read from the headers, before any data."""
        problems = (self.tensors[name].dtype_problem(expected[name].dtype)
                    for name in sorted(self.location) if name in expected)
        return [p for p in problems if p is not None]


def check_folder(folder: str | Path) -> Path:
    """The checkpoint folder as a Path; raises CheckpointError if it is missing or not a folder."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint folder {path} does not exist",
                              "point model.path at a folder holding config.json and *.safetensors files")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a file, not a folder",
                              "point model.path at the folder that holds config.json and the *.safetensors files")
    return path


def _refuse_pickles(folder: Path) -> None:
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"checkpoint folder {folder} holds only pickled weights ({', '.join(pickles[:3])}); "
            "qvl-pipeline never unpickles files, because that can run arbitrary code", _CONVERT_HINT)
    raise CheckpointError(f"checkpoint folder {folder} has no *.safetensors weight files",
                          "download the model's *.safetensors files (and model.safetensors.index.json) into it")


def _read_index(folder: Path) -> dict[str, Path]:
    index_path = folder / INDEX_FILE
    fix = f"download {INDEX_FILE} again from the model's repository"
    try:
        index = read_json(index_path, fix)
    except CheckpointError as exc:
        raise CheckpointError(f"{index_path} is corrupt: {exc.message}", fix) from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path} is corrupt (its weight_map is not a mapping of tensor name to file "
                              "name)", fix)
    location: dict[str, Path] = {}
    for name, file_name in weight_map.items():
        if "\0" in file_name or file_name in ("", ".", "..") or Path(file_name).name != file_name:
            raise CheckpointError(f"{index_path} names a shard outside the folder: {file_name!r}",
                                  f"download {INDEX_FILE} again from the model's repository")
        location[name] = folder / file_name
    missing = sorted({p.name for p in location.values() if not p.is_file()})
    if missing:
        raise CheckpointError(
            f"{index_path} names shard file(s) missing from {folder}: {', '.join(missing)}",
            "download the missing shard(s) into the folder (a partial download?)")
    return location


def find_weight_files(folder: str | Path) -> WeightFiles:
    """Locate and check every weight file of `folder`; headers are read, tensor data is not."""
    path = check_folder(folder)
    if (path / INDEX_FILE).is_file():
        location = _read_index(path)
        paths = sorted(set(location.values()))
    elif (path / SINGLE_FILE).is_file():
        paths, location = [path / SINGLE_FILE], {}
    else:
        # Shards without an index: every *.safetensors file of the folder, each tensor stored once.
        paths, location = sorted(path.glob("*.safetensors")), {}
        if not paths:
            _refuse_pickles(path)
    shards = tuple(read_header(p) for p in paths)
    by_path = {shard.path: shard for shard in shards}
    if location:
        for name, shard_path in location.items():
            if name not in by_path[shard_path].tensors:
                raise CheckpointError(f"{INDEX_FILE} places tensor {name} in {shard_path.name}, which lacks it",
                                      "download that shard and the index again: they are from different versions")
    else:
        for shard in shards:
            for name in shard.tensors:
                if name in location:
                    raise CheckpointError(
                        f"tensor {name} is stored in both {location[name].name} and {shard.path.name}",
                        f"remove the stray file, or add the model's {INDEX_FILE}")
                location[name] = shard.path
    tensors = {name: by_path[shard_path].tensors[name] for name, shard_path in location.items()}
    return WeightFiles(folder=path, shards=shards, location=location, tensors=tensors)
