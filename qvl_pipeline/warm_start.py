"""Warm start: the weights a run reads at load, read into the page cache by a few threads, beginning while the
process is still starting.

The CPU placement reads every weight it computes with into memory at load (`qvl_plugins.memory.paging.read_in`).
On a cold page cache (after a reboot, or once other programs' files pushed the quantised-weight cache out) that is a
disk read of the whole model, ~2 GB for the 2B model at `opt=moderate`. Two things make it shorter:

- `FileReader` reads file ranges with several threads into small reused buffers: the disk gets several requests at
  once and the GIL is released while they wait; pieces the page cache holds already are skipped (mincore). Reading
  through the kernel also touches every page, which under a hypervisor pays the first touch of fresh guest memory on
  every core instead of one (dev VM, 2.1 GB cache evicted: madvise-populate then a touch a page 4-7.7 s; four
  readers 2.5-4.4 s, after which mapping the pages takes 0.1-0.3 s).
- The CLI calls `begin` for `task=generate` and `task=chat` as soon as Hydra has composed the config, before torch
  is imported. The last run with the same assembly (the config groups that decide the weights, hashed by the CLI)
  left a hint of the file ranges its load read (`remember`), so the read overlaps importing torch, building the
  container and resolving the plan (~2.5 s on the dev VM). There, the default command on a 2B checkpoint with its
  cache evicted: load 4.1-4.5 -> 0.7-1.2 s, command start to exit 8.1-8.5 -> 5.8-6.5 s; cache warm: within noise.

A hint names its files with their size and modification time; a file changed since is not read early. Outside the
CLI (a notebook, the tests) nothing is read early and no hint is written; `read_in` still uses the shared reader.
Imports nothing heavy (no torch).
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

from qvl_pipeline.cache_root import default_cache_dir

READ_THREADS = 4                  # requests in flight: an NVMe drive wants several. The dev VM's virtio disk, cold
                                  # 2.1 GB: 1 thread 0.42-0.44 GB/s, 4 threads 0.64-1.04, 8-16 no better than 4
READ_CHUNK = 4 << 20              # bytes a request
HINT_DIR = "warm_start"           # under the cache root: <signature>.json per assembly
HINT_VERSION = 1
MAX_HINTS = 64                    # older hints are removed when a new one is written

FileRange = tuple[str, int, int]  # (file path, byte offset, byte length)


class FileReader:
    """Reads file ranges into the page cache with READ_THREADS daemon threads, READ_CHUNK bytes a request, skipping
    pieces the page cache holds already. A piece is read once per reader: asked for again (a warm start, then the
    load itself, split the same ranges alike) it is waited for while queued or being read, and returns at once after
    (re-checking 2 GB that is cached costs ~70 ms). Best effort: a file that cannot be read is skipped (its error
    surfaces where the weights are used; a mapping the page cache has dropped since is read again by its faults)."""

    def __init__(self, threads: int = READ_THREADS, chunk: int = READ_CHUNK) -> None:
        self.threads, self.chunk = threads, chunk
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._has_work = threading.Condition(self._lock)
        self._queue: deque[tuple[str, int, int, threading.Event]] = deque()
        self._pieces: dict[FileRange, threading.Event] = {}
        self._workers: list[threading.Thread] = []

    def submit(self, ranges: Iterable[FileRange]) -> list[threading.Event]:
        """Queue the pieces of `ranges` never asked for; returns an event per piece (set once read or skipped)."""
        events = []
        with self._lock:
            for path, offset, length in ranges:
                for start in range(offset, offset + length, self.chunk):
                    piece = (path, start, min(self.chunk, offset + length - start))
                    event = self._pieces.get(piece)
                    if event is None:
                        event = self._pieces[piece] = threading.Event()
                        self._queue.append((*piece, event))
                    events.append(event)
            while len(self._workers) < self.threads:
                worker = threading.Thread(target=self._work, name=f"qvl-read-{len(self._workers)}", daemon=True)
                worker.start()
                self._workers.append(worker)
            self._has_work.notify_all()
        return events

    def read(self, ranges: Iterable[FileRange]) -> None:
        """Read `ranges` into the page cache, blocking until every piece of them is there (or cannot be read)."""
        for event in self.submit(ranges):
            event.wait()

    def _work(self) -> None:
        buffer = bytearray(self.chunk)
        while True:
            with self._lock:
                while not self._queue:
                    self._has_work.wait()
                path, offset, length, done = self._queue.popleft()
            got = 0
            try:
                got = _read_piece(path, offset, memoryview(buffer)[:length])
            finally:
                with self._lock:
                    self.bytes_read += got
                done.set()


def _read_piece(path: str, offset: int, into: memoryview) -> int:
    """Read len(into) bytes of `path` at `offset` (fewer at the end of the file) unless they are in the page cache
    already; returns the bytes read (0 when cached, or when the file cannot be read)."""
    try:
        with open(path, "rb", buffering=0) as fh:
            if _in_page_cache(fh.fileno(), offset, len(into)):
                return 0                        # a warm start costs no copy when the file is cached already
            fh.seek(offset)
            got = 0
            while got < len(into):
                n = fh.readinto(into[got:])     # the GIL is released while the disk answers
                if not n:
                    break
                got += n
            return got
    except OSError:
        return 0


_PAGE = mmap.PAGESIZE
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _LIBC is not None:
    _LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    _LIBC.mmap.restype = ctypes.c_void_p
    _LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _LIBC.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _LIBC.mincore.restype = ctypes.c_int
_MAP_FAILED = ctypes.c_void_p(-1).value
_RESIDENT_BIT = bytes(i & 1 for i in range(256))     # mincore's flag byte -> 1 where bit 0 (resident) is set


def resident_pages(address: int, length: int) -> int:
    """How many pages of the page-aligned mapped range are in the page cache (mincore(2), Linux); OSError when the
    call fails."""
    assert _LIBC is not None
    vec = (ctypes.c_ubyte * ((length + _PAGE - 1) // _PAGE))()
    if _LIBC.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vec) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return bytes(vec).translate(_RESIDENT_BIT).count(1)


def _in_page_cache(fd: int, offset: int, length: int) -> bool:
    """Whether every page of the file's bytes [offset, offset + length) is in the page cache (resident_pages on a
    temporary mapping; False where that cannot be asked)."""
    if _LIBC is None or length <= 0:
        return False
    start = offset - offset % _PAGE
    size = offset + length - start
    address = _LIBC.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address is None or address == _MAP_FAILED:
        return False
    try:
        return resident_pages(address, size) == (size + _PAGE - 1) // _PAGE
    except OSError:
        return False
    finally:
        _LIBC.munmap(address, size)


_READER: list[FileReader] = []
_SESSION: list[tuple[str, Path]] = []           # (assembly signature, hint folder) of this process's CLI run
_REMEMBERED: dict[FileRange, None] = {}         # what this run's loads read, in order (a hint is their union)


def shared_reader() -> FileReader:
    """The process's reader (made on first use), shared by the warm start and every load."""
    if not _READER:
        _READER.append(FileReader())
    return _READER[0]


def begin(signature: str, cache_dir: Path | None = None) -> int:
    """Start a CLI run with this assembly: later loads' ranges are remembered under `signature`, and what the last
    run with it read at load is read now, in the background. Returns the bytes queued (0 without a usable hint)."""
    folder = (cache_dir or default_cache_dir()) / HINT_DIR
    _SESSION[:] = [(signature, folder)]
    _REMEMBERED.clear()
    ranges = _read_hint(folder / f"{signature}.json")
    if ranges:
        shared_reader().submit(ranges)
    return sum(length for _, _, length in ranges)


def remember(ranges: Sequence[FileRange]) -> None:
    """Record `ranges` as read at load by this CLI run (no-op outside one), for the next start with its assembly."""
    if not _SESSION:
        return
    signature, folder = _SESSION[0]
    _REMEMBERED.update(dict.fromkeys(ranges))
    files: dict[str, list[int]] = {}
    try:
        for path, _, _ in _REMEMBERED:
            stat = os.stat(path)
            files[path] = [stat.st_size, stat.st_mtime_ns]
        folder.mkdir(parents=True, exist_ok=True)
        blob = json.dumps({"version": HINT_VERSION, "files": files, "ranges": [list(r) for r in _REMEMBERED]})
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False, encoding="utf-8") as fh:
            fh.write(blob)
        os.replace(fh.name, folder / f"{signature}.json")
        _prune(folder)
    except OSError:
        pass                                    # a hint only: a read-only or full cache folder costs the speed-up


def _read_hint(path: Path) -> list[FileRange]:
    """The hint's ranges whose files still have the recorded size and modification time; [] when unusable."""
    try:
        hint = json.loads(path.read_text(encoding="utf-8"))
        if hint.get("version") != HINT_VERSION:
            return []
        unchanged = set()
        for name, (size, mtime_ns) in hint["files"].items():
            try:
                stat = os.stat(name)
            except OSError:
                continue
            if stat.st_size == size and stat.st_mtime_ns == mtime_ns:
                unchanged.add(name)
        return [(str(p), int(o), int(n)) for p, o, n in hint["ranges"] if p in unchanged]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []


def _prune(folder: Path) -> None:
    hints = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in hints[MAX_HINTS:]:
        old.unlink(missing_ok=True)
