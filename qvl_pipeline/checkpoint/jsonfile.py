"""Reading a checkpoint folder's text and JSON files: every way one can be unreadable (missing permission,
not UTF-8, not JSON, nested too deeply, too large) is one CheckpointError naming the file and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qvl_pipeline.errors import CheckpointError


def decode_text(data: bytes, where: str | Path, fix: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark is dropped); CheckpointError naming `where` otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                              fix) from exc


def read_text(path: Path, fix: str) -> str:
    """A checkpoint file's text; unreadable or non-UTF-8 content raises CheckpointError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}", fix) from exc
    return decode_text(data, path, fix)


def parse_json(text: str | bytes, where: str | Path, fix: str) -> Any:
    """Parsed JSON; invalid, too deeply nested or too large content raises CheckpointError naming `where`."""
    if isinstance(text, bytes):
        text = decode_text(text, where, fix)
    try:
        return json.loads(text)
    except RecursionError as exc:
        raise CheckpointError(f"{where} is nested too deeply to be a real file of its kind", fix) from exc
    except MemoryError as exc:
        raise CheckpointError(f"{where} is too large to parse", fix) from exc
    except ValueError as exc:        # JSONDecodeError, and integers with too many digits
        raise CheckpointError(f"{where} is not valid JSON ({exc})", fix) from exc


def read_json(path: Path, fix: str) -> Any:
    """A checkpoint JSON file, parsed; every way it can be unreadable raises CheckpointError naming the file."""
    return parse_json(read_text(path, fix), path, fix)
