"""Header-driven memory mapping of safetensors files: the same tensors safetensors reads, and none of their data
touched until used."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qvl_pipeline.checkpoint.header import read_header
from qvl_pipeline.checkpoint.mapping import map_tensors

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8, torch.int64, torch.bool)


def sample() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        values = torch.randn(3 + i, 5, generator=gen) * 40
        out[f"t{i}"] = values > 0 if dtype == torch.bool else values.to(dtype)
    out["scalar"] = torch.tensor(2.5)
    out["empty"] = torch.empty(0, 4)
    return out


def test_mapped_tensors_equal_what_safetensors_reads(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sample(), str(path))
    mapped = map_tensors(read_header(path))
    with safe_open(str(path), framework="pt") as reader:
        assert set(mapped) == set(reader.keys())
        for name in reader.keys():
            want = reader.get_tensor(name)
            assert mapped[name].dtype == want.dtype and mapped[name].shape == want.shape, name
            assert torch.equal(mapped[name], want), name
            assert mapped[name].is_contiguous()


def test_a_subset_maps_only_the_named_tensors(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sample(), str(path))
    assert set(map_tensors(read_header(path), ["t1", "scalar"])) == {"t1", "scalar"}


def _raw_file(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file laid out exactly as given (no alignment padding)."""
    header, data = {}, b""
    for name, dtype, shape, blob in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(blob)]}
        data += blob
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_misaligned_data_is_copied_not_viewed(tmp_path: Path) -> None:
    # one byte before a float32 tensor: a view of it would be misaligned, so it is read into its own memory
    values = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    path = tmp_path / "odd.safetensors"
    _raw_file(path, [("pad", "U8", [1], b"\x07"), ("x", "F32", [2, 3], values.numpy().tobytes())])
    shard = read_header(path)
    assert shard.tensors["x"].offset % 4 == 1
    mapped = map_tensors(shard)
    assert torch.equal(mapped["x"], values) and mapped["pad"].tolist() == [7]


def _mapped_rss_kib(path: Path) -> int:
    """Resident KiB of this process's mappings of `path` (pages it has faulted in), from /proc/self/smaps."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:              # a mapping's first line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps (Linux)")
def test_mapping_reads_no_tensor_data(tmp_path: Path) -> None:
    # A tensor's pages are faulted into the process only when it is used: loading a quantised run's checkpoint
    # must not read the float linears it replaces.
    path = tmp_path / "big.safetensors"
    save_file({f"w{i}": torch.ones(256, 1024) for i in range(8)}, str(path))     # 8 MiB of data
    mapped = map_tensors(read_header(path))
    assert _mapped_rss_kib(path) == 0
    assert float(mapped["w3"].sum()) == 256 * 1024
    assert _mapped_rss_kib(path) >= 1024                                      # that tensor's MiB, now read
    assert _mapped_rss_kib(path) < 8 * 1024

