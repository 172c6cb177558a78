"""Page residency of memory-mapped weights (Linux): where a tensor's bytes live in which file, and the system calls
that read them in ahead of use (MADV_POPULATE_READ after POSIX_FADV_WILLNEED) and give them back after use
(MADV_DONTNEED on the mapping, POSIX_FADV_DONTNEED on the file's page cache).

Weights the loader maps (the checkpoint's safetensors, the quantised cache) are private read-only file mappings:
dropping their pages loses nothing, the next access reads them from the file again.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qvl_pipeline import warm_start

PAGE = mmap.PAGESIZE
MADV_DONTNEED = 4
MADV_POPULATE_READ = 22          # Linux 5.14+: fault the range in, EFAULT instead of SIGBUS past the end of a file
MAPS = "/proc/self/maps"


def supported() -> list[str]:
    """Why page residency cannot be managed here; empty when it can (Linux with /proc/self/maps and madvise)."""
    if not sys.platform.startswith("linux"):
        return [f"needs Linux (madvise, posix_fadvise, /proc/self/maps); this is {sys.platform}"]
    if not os.path.exists(MAPS):
        return [f"needs {MAPS}"]
    return []


_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    _libc.madvise.restype = ctypes.c_int


def madvise(address: int, length: int, advice: int) -> None:
    """madvise(2) on a page-aligned range (the GIL is released during the call); OSError on failure."""
    assert _libc is not None
    if _libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), advice) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


@dataclass(frozen=True)
class FileMapping:
    start: int
    end: int
    offset: int          # file offset of `start`
    path: str


def file_mappings() -> list[FileMapping]:
    """This process's mappings of regular files, sorted by address."""
    found = []
    with open(MAPS, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) < 6 or not fields[5].startswith("/"):
                continue
            path = fields[5].rstrip("\n")
            if path.endswith(" (deleted)"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            found.append(FileMapping(start, end, int(fields[2], 16), path))
    found.sort(key=lambda m: m.start)
    return found


@dataclass(frozen=True)
class Extent:
    """A page-aligned range of a file mapping: `length` bytes at `address`, the file's bytes at `offset`."""

    address: int
    length: int
    path: str
    offset: int


def tensor_span(t: torch.Tensor) -> tuple[int, int]:
    """(first byte address, byte length) that the tensor's elements occupy."""
    if t.numel() == 0:
        return t.data_ptr(), 0
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), (last + 1) * t.element_size()


def _merge(extents: list[Extent]) -> list[Extent]:
    out: list[Extent] = []
    for e in sorted(extents, key=lambda e: (e.path, e.address)):
        if out and out[-1].path == e.path and e.address <= out[-1].address + out[-1].length \
                and e.offset - e.address == out[-1].offset - out[-1].address:
            last = out[-1]
            end = max(last.address + last.length, e.address + e.length)
            out[-1] = Extent(last.address, end - last.address, last.path, last.offset)
        else:
            out.append(e)
    return out


@dataclass(frozen=True)
class Residency:
    """Where a set of tensors' bytes live: page-aligned file extents covering every byte (rounded outward), and the
    bytes found in no file mapping.

    Giving back the edge pages too is harmless (a neighbouring tensor that uses one faults it in again) and
    needed: the page cache keeps large folios, and a folio any page of which is still mapped cannot be evicted."""

    extents: tuple[Extent, ...]
    mapped: int
    anonymous: int

    @property
    def nbytes(self) -> int:
        return sum(e.length for e in self.extents)


def residency(tensors: Iterable[torch.Tensor], maps: list[FileMapping] | None = None) -> Residency:
    """The file extents backing `tensors` (each byte range counted once)."""
    maps = file_mappings() if maps is None else maps
    starts = [m.start for m in maps]
    found, seen = [], set()
    mapped = anonymous = 0
    for t in tensors:
        if t.device.type != "cpu":
            continue
        address, length = tensor_span(t)
        if length == 0 or (address, length) in seen:
            continue
        seen.add((address, length))
        i = bisect.bisect_right(starts, address) - 1
        if i < 0 or address + length > maps[i].end:
            anonymous += length
            continue
        m = maps[i]
        mapped += length
        lo, hi = address - address % PAGE, -(-(address + length) // PAGE) * PAGE
        found.append(Extent(lo, hi - lo, m.path, m.offset + lo - m.start))
    return Residency(tuple(_merge(found)), mapped, anonymous)


class Pager:
    """Reads extents of the files in `paths` into memory and gives them back. `drop_page_cache` also evicts the
    pages from the page cache after use (POSIX_FADV_DONTNEED), so streamed weights hold no RAM between uses. The
    files are opened once here (OSError when one is gone); load and release may run on different threads."""

    def __init__(self, paths: Iterable[str], drop_page_cache: bool = True) -> None:
        self.drop_page_cache = drop_page_cache
        self._fds: dict[str, int] = {}
        self._populate = True
        try:
            for path in sorted(set(paths)):
                self._fds[path] = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            self.close()
            raise

    def _fd(self, path: str) -> int:
        return self._fds[path]

    def load(self, extents: Iterable[Extent]) -> int:
        """Read the extents' pages in and map them (blocking); returns the bytes read. OSError when the file cannot
        deliver them (e.g. truncated: EFAULT, never SIGBUS)."""
        total = 0
        for e in extents:
            os.posix_fadvise(self._fd(e.path), e.offset, e.length, os.POSIX_FADV_WILLNEED)
            if self._populate:
                try:
                    madvise(e.address, e.length, MADV_POPULATE_READ)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._populate = False       # kernel before 5.14: read-ahead only, compute faults the rest
            total += e.length
        return total

    def release(self, extents: Iterable[Extent]) -> None:
        """Unmap the extents' pages from this process and, with drop_page_cache, evict them from the page cache."""
        for e in extents:
            madvise(e.address, e.length, MADV_DONTNEED)
            if self.drop_page_cache:
                os.posix_fadvise(self._fd(e.path), e.offset, e.length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def drop_file_cache(path: str | os.PathLike[str]) -> None:
    """Evict a whole file's pages from the page cache (POSIX_FADV_DONTNEED; no root needed). Pages some process
    still maps stay."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def mapped_extents(modules: Iterable[nn.Module]) -> tuple[Extent, ...]:
    """The file extents behind the memory-mapped parameters and buffers of `modules`; none where page residency is
    not managed (not Linux)."""
    if supported():
        return ()
    return residency([t for m in modules for t in (*m.parameters(), *m.buffers())]).extents


def read_in(modules: Iterable[nn.Module]) -> int:
    """Read the file-backed (memory-mapped) weights of `modules` into memory now, blocking; returns the bytes.

    A resident run maps its weights from the checkpoint or the quantised-weight cache; without this, the first
    request's vision tower and prefill fault them in from disk inside the time to first token (a cold 2 GB int8
    cache at ~0.5 GB/s: +2-4 s measured in the peers kit) instead of at load. The files are read by the warm start's
    shared reader (several requests in flight; ranges a CLI warm start already read are not read again), and the
    ranges are remembered as this assembly's warm-start hint. No-op for anonymous memory and where page residency is
    not managed (not Linux)."""
    extents = mapped_extents(modules)
    if not extents:
        return 0
    ranges = [(e.path, e.offset, e.length) for e in extents]
    warm_start.remember(ranges)
    warm_start.shared_reader().read(ranges)
    pager = Pager((e.path for e in extents), drop_page_cache=False)
    try:
        total = pager.load(extents)             # maps the pages, page-cache hits by now
    finally:
        pager.close()
    touch_pages(extents)
    return total


READ_AHEAD_CHUNK = 128 * 1024     # Linux reads one read-ahead window per POSIX_FADV_WILLNEED (128 KiB default)


def read_ahead(modules: Iterable[nn.Module]) -> int:
    """Have the files behind the memory-mapped weights of `modules` read into the page cache by a background
    thread (POSIX_FADV_WILLNEED, one read-ahead window at a time); returns the bytes asked for, at once.

    For tables that are looked up a few rows at a time (the token embedding): nothing is mapped into the process,
    so resident memory grows only by the rows used, but a row first used by a prompt or mid-generation is a
    page-cache hit instead of a fault to disk (dev VM, table not in the page cache: ~10 ms per row touched,
    against 0.01-0.6 ms once read ahead; ~190 ms to read the 2B model's 594 MiB table). llama.cpp asks the same for
    its whole model file. No-op where page residency is not managed."""
    extents = mapped_extents(modules)
    if extents:
        threading.Thread(target=_advise_will_need, args=(extents,), name="qvl-read-ahead", daemon=True).start()
    return sum(e.length for e in extents)


def _advise_will_need(extents: Sequence[Extent]) -> None:
    for e in extents:
        try:
            fd = os.open(e.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue            # read-ahead only: a file gone fails where it is used, with its error
        try:
            for at in range(e.offset, e.offset + e.length, READ_AHEAD_CHUNK):
                os.posix_fadvise(fd, at, min(READ_AHEAD_CHUNK, e.offset + e.length - at), os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def touch_pages(extents: Iterable[Extent]) -> None:
    """Read one byte of every page of the (mapped, populated) extents.

    Under a hypervisor the first access to a page just read from disk can cost microseconds more than later ones
    with no fault in the guest (measured on the 2-core dev VM: 2.1 GB of a cold quantised-weight cache, one byte a
    page: 2.4 s the first time, 0.02 s after; without this the first request's vision tower and prefill paid it:
    TTFT 3.5-4.2 s against 1.4-1.9 s for the second). After read_in's reader, which touched every page it read
    through the kernel, it costs 0.02-0.1 s there; on bare metal ~10 ms for 2 GB."""
    for e in extents:
        view = torch.frombuffer((ctypes.c_ubyte * e.length).from_address(e.address), dtype=torch.uint8)
        view[::PAGE].sum()
