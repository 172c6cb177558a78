"""The header of one safetensors file: tensor names, dtypes, shapes and byte ranges, read without the data."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from qvl_pipeline.errors import CheckpointError

# A header larger than this is not a real checkpoint header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000

_REDOWNLOAD = "the file is damaged or was only partly downloaded: download or convert it again"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                  # safetensors spelling: "BF16", "F32", ...
    shape: tuple[int, ...]
    nbytes: int


@dataclass(frozen=True)
class ShardHeader:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_bytes: int


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
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"shard {path} has a corrupt header ({exc})", _REDOWNLOAD) from exc

    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_end = 0
    try:
        for name, entry in header.items():
            begin, end = (int(x) for x in entry["data_offsets"])
            tensors[name] = TensorInfo(name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]),
                                       end - begin)
            data_end = max(data_end, end)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"shard {path} has a corrupt header entry ({exc!r})", _REDOWNLOAD) from exc
    expected = 8 + header_len + data_end
    if expected != file_bytes:
        what = "truncated" if file_bytes < expected else "longer than its header describes"
        raise CheckpointError(
            f"shard {path} is {what}: its header describes {expected} bytes but the file holds {file_bytes}",
            _REDOWNLOAD)
    return ShardHeader(path=path, tensors=tensors, metadata=dict(metadata), file_bytes=file_bytes)
