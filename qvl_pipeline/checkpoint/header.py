"""The header of one safetensors file: tensor names, dtypes, shapes and byte ranges, read without the data."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qvl_pipeline.checkpoint.jsonfile import parse_json
from qvl_pipeline.errors import CheckpointError

# A header larger than this is not a real checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

_REDOWNLOAD = "the file is damaged or was only partly downloaded: download or convert it again"

# safetensors dtype names -> torch dtypes (those this torch build has).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr) for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2", "float8_e5m2"),
        ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"),
        ("U64", "uint64"), ("U32", "uint32"), ("U16", "uint16"), ("U8", "uint8"), ("BOOL", "bool"),
        ("C64", "complex64"))
    if hasattr(torch, attr)
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int
    offset: int                 # where its data starts in the file (bytes from the file's start)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The stored dtype as torch's (read_header only admits dtypes that have one)."""
        return SAFETENSORS_DTYPES[self.dtype]

    def dtype_problem(self, expected: torch.dtype) -> str | None:
        """Why this stored tensor cannot fill a model tensor of dtype `expected`, or None if it can: a floating
        weight takes any floating dtype (converted while loading); any other tensor takes exactly its dtype."""
        stored = self.torch_dtype
        if expected.is_floating_point:
            if stored.is_floating_point:
                return None
            kind = "booleans" if stored == torch.bool else "complex numbers" if stored.is_complex else "integers"
            return (f"tensor {self.name} is stored as {self.dtype} ({kind}) but the model expects floating-point "
                    f"values ({str(expected).removeprefix('torch.')})")
        if stored != expected:
            return (f"tensor {self.name} is stored as {self.dtype} but the model expects "
                    f"{str(expected).removeprefix('torch.')}")
        return None


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_bytes: int


def _entry(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry, checked: a known dtype, a shape of non-negative sizes, and a byte range that holds
    exactly that many elements."""
    try:
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise ValueError(f"shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"data_offsets {offsets!r} is not a [begin, end] byte range")
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"shard {path} has a corrupt header entry for {name!r} ({exc})", _REDOWNLOAD) from exc
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"shard {path} stores tensor {name} as {dtype!r}, a dtype this loader cannot read",
                              "use the model's safetensors files in bfloat16, float16 or float32")
    info = TensorInfo(name, dtype, tuple(shape), offsets[1] - offsets[0], data_start + offsets[0])
    expected = math.prod(info.shape) * info.torch_dtype.itemsize
    if info.nbytes != expected:
        raise CheckpointError(f"shard {path} gives tensor {name} {info.nbytes} bytes, but {dtype} of shape "
                              f"{list(info.shape)} takes {expected}", _REDOWNLOAD)
    return info


def read_header(path: Path) -> ShardHeader:
    """Parse and check the header of `path`; a short, oversized or malformed file raises CheckpointError."""
    try:
        file_bytes = path.stat().st_size
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"shard {path} is truncated: {file_bytes} bytes, too short for a header",
                                      _REDOWNLOAD)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > file_bytes:
                raise CheckpointError(
                    f"shard {path} is truncated or not a safetensors file: its header claims {header_len} bytes "
                    f"but the file holds {file_bytes}", _REDOWNLOAD)
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"cannot read shard {path}: {exc}", "check the file exists and is readable") from exc
    try:
        header = parse_json(raw, f"the header of shard {path}", _REDOWNLOAD)
    except CheckpointError as exc:
        raise CheckpointError(f"shard {path} has a corrupt header ({exc.message})", _REDOWNLOAD) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"shard {path} has a corrupt header (not a JSON object)", _REDOWNLOAD)

    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        info = _entry(path, name, entry, 8 + header_len)
        tensors[name] = info
        data_end = max(data_end, int(entry["data_offsets"][1]))
    expected = 8 + header_len + data_end
    if expected != file_bytes:
        what = "truncated" if file_bytes < expected else "longer than its header describes"
        raise CheckpointError(
            f"shard {path} is {what}: its header describes {expected} bytes but the file holds {file_bytes}",
            _REDOWNLOAD)
    return ShardHeader(path=path, tensors=tensors, metadata=dict(metadata), file_bytes=file_bytes)
