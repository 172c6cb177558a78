"""On-disk cache of derived (e.g. quantised) weights, so a second start maps them instead of recomputing them.

Layout: `<cache dir>/quantized/<key>/{tensors.safetensors, manifest.json}`. The key hashes the source checkpoint's
identity (shard names, sizes, mtimes and header bytes), the format's name and parameters, and FORMAT_VERSION. An
entry is written into a temporary folder and renamed into place, so readers see a complete entry or none; an entry
that fails its checks (manifest, size, header, expected names/shapes/dtypes) reads as absent and the next store
replaces it. Tensors are stored 64-byte aligned and read memory-mapped (no copy). Only safetensors, never pickle;
nothing is ever written into the checkpoint folder. Pure I/O: it knows nothing of plugins or formats.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint.files import find_weight_files
from qvl_pipeline.checkpoint.header import read_header
from qvl_pipeline.checkpoint.mapping import map_tensors
from qvl_pipeline.errors import CheckpointError

FORMAT_VERSION = 2                  # of this cache's layout and quantisers; part of every key (2: int4 refits)
SUBDIR = "quantized"
TENSORS_FILE = "tensors.safetensors"
MANIFEST_FILE = "manifest.json"
ALIGN = 64                          # byte alignment of every stored tensor (SIMD kernels load aligned vectors)
PAD_PREFIX = "__pad__."             # filler tensors that keep the next tensor aligned (safetensors allows no holes)
STALE_TEMP_S = 3600                 # a temporary folder older than this is a crashed writer's and is removed
SPACE_MARGIN = 1.05                 # free space needed: the entry's size times this

_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64", torch.int8: "I8",
    torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL",
}

Expected = Mapping[str, tuple[tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class SourceCheckpoint:
    """A checkpoint folder's identity and the name -> (safetensors dtype, shape) of every stored tensor."""

    folder: Path
    fingerprint: str
    tensors: Mapping[str, tuple[str, tuple[int, ...]]]

    @classmethod
    def read(cls, folder: str | Path) -> SourceCheckpoint:
        """Hash the shards' names, sizes, mtimes and header bytes (the data itself is not read)."""
        files = find_weight_files(folder)
        parts = []
        for shard in sorted(files.shards, key=lambda s: s.path.name):
            stat = shard.path.stat()
            with shard.path.open("rb") as fh:
                (header_len,) = struct.unpack("<Q", fh.read(8))
                header_hash = hashlib.sha256(fh.read(header_len)).hexdigest()
            parts.append({"name": shard.path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                          "header": header_hash})
        fingerprint = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        tensors = {name: (info.dtype, tuple(info.shape)) for name, info in files.tensors.items()}
        return cls(Path(folder), fingerprint, tensors)


def cache_key(source_fingerprint: str, fmt: str, params: Mapping[str, Any]) -> str:
    """The entry name for `fmt` with `params` (JSON-serialisable) derived from the source with that fingerprint."""
    blob = json.dumps({"source": source_fingerprint, "format": fmt, "params": params, "version": FORMAT_VERSION},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class AlignedSafetensorsWriter:
    """Writes one safetensors file whose every tensor starts 64-byte aligned, a tensor at a time: the header is
    laid out from `specs` (name -> (shape, dtype), in file order) and each `write` must follow that order."""

    def __init__(self, path: Path, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                 metadata: Mapping[str, str] | None = None) -> None:
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        self._order: list[tuple[str, tuple[int, ...], torch.dtype, int]] = []   # name, shape, dtype, padding before
        offset = 0
        for name, (shape, dtype) in specs.items():
            if name.startswith(PAD_PREFIX):
                raise ValueError(f"tensor name {name!r} is reserved for padding")
            if dtype not in _DTYPES:
                raise ValueError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
            pad = -offset % ALIGN
            if pad:
                header[f"{PAD_PREFIX}{len(self._order)}"] = {"dtype": "U8", "shape": [pad],
                                                             "data_offsets": [offset, offset + pad]}
                offset += pad
            nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, tuple(shape), dtype, pad))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % ALIGN)          # trailing spaces: allowed, and align the data start
        self.size = 8 + len(raw) + offset
        self._next = 0
        self._fh = path.open("wb")
        try:
            self._fh.write(struct.pack("<Q", len(raw)))
            self._fh.write(raw)
        except BaseException:
            self._fh.close()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, shape and dtype must be the next ones of `specs`."""
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name} is one more than the file's layout holds")
        want, shape, dtype, pad = self._order[self._next]
        if name != want or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(f"expected {want} {list(shape)} {dtype} next, got {name} {list(tensor.shape)} "
                             f"{tensor.dtype}")
        if pad:
            self._fh.write(bytes(pad))
        if tensor.numel():
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._fh.write(memoryview(data.numpy()))
        self._next += 1

    def close(self) -> int:
        """Flush to disk and close; returns the file's size. Raises ValueError when tensors are missing."""
        try:
            if self._next != len(self._order):
                raise ValueError(f"{len(self._order) - self._next} tensor(s) of the layout were never written")
            self._fh.flush()
            os.fsync(self._fh.fileno())
        finally:
            self._fh.close()
        return self.size

    def discard(self) -> None:
        self._fh.close()


def write_aligned_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                              metadata: Mapping[str, str] | None = None) -> int:
    """Write `tensors` as one safetensors file whose every tensor starts 64-byte aligned; returns its size."""
    writer = AlignedSafetensorsWriter(path, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, metadata)
    try:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
    except BaseException:
        writer.discard()
        raise
    return writer.close()


def read_mapped(path: Path) -> dict[str, torch.Tensor]:
    """Every (non-padding) tensor of a safetensors file, memory-mapped, none of their data read (map_tensors);
    CheckpointError for a malformed file, OSError or RuntimeError for one that cannot be opened or mapped."""
    shard = read_header(path)
    return map_tensors(shard, [name for name in shard.tensors if not name.startswith(PAD_PREFIX)])


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return                                          # not possible on every platform; the rename still happened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class QuantCache:
    """Entries of derived tensors under `<root>/quantized/`."""

    def __init__(self, root: str | Path) -> None:
        self.dir = Path(root).expanduser() / SUBDIR

    def entry(self, key: str) -> Path:
        return self.dir / key

    def load(self, key: str, expected: Expected | None = None) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, memory-mapped; None when it is absent, incomplete, corrupt, or (with `expected`)
        does not hold exactly the expected names with those shapes and dtypes."""
        folder = self.entry(key)
        try:
            manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
            if manifest.get("version") != FORMAT_VERSION or manifest.get("key") != key:
                return None
            path = folder / TENSORS_FILE
            if path.stat().st_size != manifest.get("bytes"):
                return None
            tensors = read_mapped(path)
        except (OSError, ValueError, RuntimeError, CheckpointError, AttributeError, TypeError):
            return None
        if len(tensors) != manifest.get("tensors"):
            return None
        if expected is not None:
            if set(tensors) != set(expected):
                return None
            for name, (shape, dtype) in expected.items():
                if tuple(tensors[name].shape) != tuple(shape) or tensors[name].dtype != dtype:
                    return None
        return tensors

    def store(self, key: str, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | None = None) -> Path:
        """Write an entry atomically (temporary folder, then rename) and return its folder. An existing valid
        entry is kept; an invalid one is replaced. Raises OSError when it cannot be written (e.g. disk full)."""
        writer = self.writer(key, {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}, meta)
        try:
            for name, tensor in tensors.items():
                writer.write(name, tensor)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def writer(self, key: str, specs: Expected, meta: Mapping[str, Any] | None = None) -> EntryWriter:
        """Start an entry whose tensors (name -> (shape, dtype), in this order) are then written one at a time,
        so they need not all be in memory at once. Raises OSError when the disk lacks the space."""
        return EntryWriter(self, key, specs, meta)

    def remove_stale_temps(self, key: str) -> None:
        """Remove temporary folders of `key` left by writers that crashed (older than STALE_TEMP_S)."""
        now = time.time()
        for tmp in self.dir.glob(f".{key}.*"):
            try:
                if now - tmp.stat().st_mtime > STALE_TEMP_S:
                    shutil.rmtree(tmp, ignore_errors=True)
            except OSError:
                pass


class EntryWriter:
    """One cache entry being written: a temporary folder, renamed into place by `commit` (see QuantCache.writer)."""

    def __init__(self, cache: QuantCache, key: str, specs: Expected, meta: Mapping[str, Any] | None) -> None:
        self.cache, self.key, self.meta = cache, key, dict(meta or {})
        cache.dir.mkdir(parents=True, exist_ok=True)
        cache.remove_stale_temps(key)
        need = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
                   for shape, dtype in specs.values()) * SPACE_MARGIN + 2**20
        free = shutil.disk_usage(cache.dir).free
        if free < need:
            raise OSError(f"{free / 2**30:.2f} GiB free in {cache.dir}, the entry needs {need / 2**30:.2f} GiB")
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache.dir))
        self.count = len(specs)
        try:
            self._file = AlignedSafetensorsWriter(self.tmp / TENSORS_FILE, specs, {"key": key})
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._file.write(name, tensor)

    def abort(self) -> None:
        """Drop the partial entry."""
        self._file.discard()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def commit(self) -> Path:
        """Finish the file, write the manifest, rename the folder into place; returns the entry's folder. A valid
        entry already there (another process finished first) is kept; an invalid one is replaced."""
        final = self.cache.entry(self.key)
        try:
            nbytes = self._file.close()
            manifest = {"version": FORMAT_VERSION, "key": self.key, "bytes": nbytes, "tensors": self.count,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "meta": self.meta}
            with (self.tmp / MANIFEST_FILE).open("w", encoding="utf-8") as fh:
                json.dump(manifest, fh, indent=1, default=str)
                fh.flush()
                os.fsync(fh.fileno())
            if final.exists():
                if self.cache.load(self.key) is not None:
                    shutil.rmtree(self.tmp, ignore_errors=True)
                    return final
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(self.tmp, final)
            except OSError:
                if self.cache.load(self.key) is None:           # not a concurrent writer's complete entry
                    raise
                shutil.rmtree(self.tmp, ignore_errors=True)
            _fsync_dir(self.cache.dir)
            return final
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
