"""Warm start: the reader puts file ranges in the page cache (skipping cached pieces, never reading a queued piece
twice, never hanging on a bad file), a CLI run leaves a hint of what its load read, and the next start with the same
settings reads it early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import pytest

from qvl_pipeline import warm_start
from qvl_pipeline.__main__ import assembly_signature
from qvl_pipeline.warm_start import FileReader, begin, remember
from tests.conftest import write_tiny_checkpoint

MIB = 1 << 20


@pytest.fixture(autouse=True)
def _fresh_session(monkeypatch):
    """Each test starts as a process that has not begun a CLI run, with a reader of its own."""
    monkeypatch.setattr(warm_start, "_SESSION", [])
    monkeypatch.setattr(warm_start, "_REMEMBERED", {})
    monkeypatch.setattr(warm_start, "_READER", [])


def _file(tmp_path, size: int, name: str = "w.bin") -> str:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    with path.open("rb+") as fh:
        os.fsync(fh.fileno())                           # clean pages: the page cache can drop them
    return str(path)


def _evict(path: str) -> bool:
    """Drop the file from the page cache; False where this system keeps it (e.g. tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return not warm_start._in_page_cache(fd, 0, os.path.getsize(path))
    finally:
        os.close(fd)


def _cached(path: str) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return warm_start._in_page_cache(fd, 0, os.path.getsize(path))
    finally:
        os.close(fd)


def test_the_reader_reads_what_is_not_cached_and_skips_what_is(tmp_path, monkeypatch):
    size = 3 * MIB + 123                                # three whole pieces and a partial one
    path = _file(tmp_path, size)
    monkeypatch.setattr(warm_start, "_in_page_cache", lambda fd, offset, length: offset == MIB)
    reader = FileReader(threads=2, chunk=MIB)
    reader.read([(path, 0, size)])
    assert reader.bytes_read == size - MIB              # every piece but the cached one, the partial tail included


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache residency is asked with Linux mincore")
def test_page_cache_residency_is_read_from_the_kernel(tmp_path):
    path = _file(tmp_path, 2 * MIB + 123)
    if not _evict(path):
        pytest.skip("this file system keeps the file in memory (posix_fadvise cannot evict it)")
    assert not _cached(path)
    with open(path, "rb") as fh:
        fh.read()
    assert _cached(path)


def test_a_piece_asked_for_again_is_read_once(tmp_path, monkeypatch):
    path = _file(tmp_path, 4 * MIB)
    release, calls = threading.Event(), []

    def slow_read(p, offset, into):
        calls.append((p, offset, len(into)))
        release.wait(10)
        return len(into)

    monkeypatch.setattr(warm_start, "_read_piece", slow_read)
    reader = FileReader(threads=2, chunk=MIB)
    early = reader.submit([(path, 0, 4 * MIB)])         # the warm start
    later = reader.submit([(path, 0, 4 * MIB)])         # the load, while the warm start is still reading
    release.set()
    for event in early + later:
        assert event.wait(10)
    assert sorted(offset for _, offset, _ in calls) == [0, MIB, 2 * MIB, 3 * MIB]
    reader.read([(path, MIB, MIB)])                     # done already: not read again by this reader
    assert len(calls) == 4


def test_a_missing_file_or_a_range_past_its_end_does_not_hang_or_raise(tmp_path):
    path = _file(tmp_path, 1000)
    reader = FileReader(threads=2, chunk=MIB)
    reader.read([(str(tmp_path / "gone.bin"), 0, 10 * MIB), (path, 0, 2 * MIB)])
    assert reader.bytes_read in (0, 1000)               # 0 where the file was still cached, else its 1000 bytes


def test_a_hint_is_left_only_by_a_cli_run_and_read_back_by_the_next_start(tmp_path, monkeypatch):
    weights = _file(tmp_path, 8192)
    hints = tmp_path / "cache"
    remember([(weights, 0, 4096)])                      # not a CLI run: nothing is written
    assert not (hints / warm_start.HINT_DIR).exists()

    assert begin("sig", hints) == 0                     # first start: no hint yet
    remember([(weights, 0, 4096)])
    remember([(weights, 4096, 4096)])                   # a second load in the same run: the hint is the union
    assert json.loads((hints / warm_start.HINT_DIR / "sig.json").read_text())["ranges"] == [
        [weights, 0, 4096], [weights, 4096, 4096]]

    asked: list[list] = []
    monkeypatch.setattr(warm_start, "shared_reader", lambda: type("R", (), {"submit": asked.append})())
    assert begin("sig", hints) == 8192                  # the next start reads both ranges early
    assert asked == [[(weights, 0, 4096), (weights, 4096, 4096)]]
    assert begin("other", hints) == 0                   # other settings: their own hint (none)

    os.utime(weights, ns=(1, 1))                        # the file changed since: not read early
    assert begin("sig", hints) == 0
    (hints / warm_start.HINT_DIR / "sig.json").write_text("{not json")
    assert begin("sig", hints) == 0


def test_old_hints_are_pruned(tmp_path, monkeypatch):
    weights = _file(tmp_path, 4096)
    monkeypatch.setattr(warm_start, "MAX_HINTS", 2)
    for i, name in enumerate(("a", "b", "c")):
        begin(name, tmp_path)
        remember([(weights, 0, 4096)])
        os.utime(tmp_path / warm_start.HINT_DIR / f"{name}.json", (1000 + i, 1000 + i))
    assert sorted(p.stem for p in (tmp_path / warm_start.HINT_DIR).glob("*.json")) == ["b", "c"]


def test_the_signature_follows_the_assembly_not_the_request():
    base = {"opt": {"level": "moderate"}, "model": {"path": "/m"}, "prompt": "a", "image": "x.png"}
    assert assembly_signature(base) == assembly_signature({**base, "prompt": "b", "image": "y.png"})
    assert assembly_signature(base) != assembly_signature({**base, "opt": {"level": "aggressive"}})
    assert assembly_signature(base) != assembly_signature({**base, "model": {"path": "/other"}})
    assert assembly_signature(base) != assembly_signature({**base, "kernels": {"choice": "int8_weight_only"}})


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="weights are read in at load only on Linux")
def test_the_second_cli_start_reads_what_the_first_read_at_load(tmp_path):
    folder = write_tiny_checkpoint(layers=2)
    args = [sys.executable, "-m", "qvl_pipeline", "progress=false", f"model.path={folder}",
            "generate.max_new_tokens=2", "memory=cpu", f"results_dir={tmp_path / 'out'}"]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert first.returncode == 0, first.stderr
    assert "warm start" not in first.stderr
    second = subprocess.run(args, capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert second.returncode == 0, second.stderr
    assert "warm start: reading the" in second.stderr
    other = subprocess.run([*args, "opt=minimal"], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert other.returncode == 0 and "warm start" not in other.stderr     # other settings, no hint yet
