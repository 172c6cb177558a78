"""Weights streamed from disk ahead of compute (memory=ssd_stream).

A *unit* is the weights of one decoder layer, of the output head or of one vision block. A background thread reads
units into memory a few ahead of the one computing, within a fixed pool of bytes, and each unit is given back
after use. The maths is untouched: the weights stay the same memory-mapped tensors (the checkpoint's safetensors or
the quantised cache), only their pages come and go (see paging.py), so outputs are bit-identical to the resident
run. Forward pre-hooks take a unit (waiting for its read if needed), forward hooks give it back.

A read that fails (the file truncated or unreadable while the model runs) fails the step with one CheckpointError;
the thread never blocks the compute thread forever: waiting also watches that the thread is alive.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from qvl_pipeline.errors import CheckpointError, ConfigError
from qvl_pipeline.memory_plan import window_bytes
from qvl_plugins.memory.paging import Pager, Residency, file_mappings, residency

WAIT_S = 0.5                      # how often a waiting compute thread checks that the prefetch thread is alive
FILE_BACKED_SHARE = 0.9           # a streamed unit must have at least this share of its bytes mapped from a file


class State(Enum):
    IDLE = "idle"                 # not in memory (or given back)
    QUEUED = "queued"
    LOADING = "loading"
    READY = "ready"               # read, waiting for compute
    IN_USE = "in use"
    FAILED = "failed"


@dataclass(eq=False)
class Unit:
    """The weights one module computes with, and where its bytes come from."""

    name: str
    residency: Residency
    state: State = State.IDLE
    error: BaseException | None = None
    evict: bool = False           # give it back as soon as its read finishes

    @property
    def nbytes(self) -> int:
        return self.residency.nbytes


@dataclass
class StreamStats:
    """What the prefetcher did: bytes and seconds of reads, the most bytes held at once, waits of compute."""

    bytes_read: int = 0
    read_seconds: float = 0.0
    units_read: int = 0
    peak_held: int = 0
    compute_waits: int = 0
    wait_seconds: float = 0.0

    @property
    def read_gb_s(self) -> float:
        return self.bytes_read / self.read_seconds / 1e9 if self.read_seconds else 0.0


@dataclass(eq=False)
class _Shared:
    """State of one prefetcher shared with its thread (the thread never references the Prefetcher itself, so the
    Prefetcher can be collected and its finalizer stop the thread)."""

    pager: Pager
    pool: int
    cond: threading.Condition = field(default_factory=threading.Condition)
    queue: deque[Unit] = field(default_factory=deque)
    held: int = 0                 # bytes of units queued, loading, ready or in use
    stats: StreamStats = field(default_factory=StreamStats)
    closed: bool = False

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def give_back(self, unit: Unit) -> None:
        """Release a unit that is in memory (called without the lock held: the system calls may take a while)."""
        self.pager.release(unit.residency.extents)
        with self.cond:
            unit.state = State.IDLE
            self.held -= unit.nbytes
            self.cond.notify_all()


def _worker(shared: _Shared) -> None:
    """The prefetch thread: read queued units in order; a read error marks the unit FAILED (never raises)."""
    while True:
        with shared.cond:
            while not shared.queue and not shared.closed:
                shared.cond.wait()
            if shared.closed:
                return
            unit = shared.queue.popleft()
            if unit.state is not State.QUEUED:
                continue
            unit.state = State.LOADING
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            nbytes = shared.pager.load(unit.residency.extents)
        except BaseException as exc:         # reported to the compute thread, which raises it
            error, nbytes = exc, 0
        seconds = time.perf_counter() - start
        with shared.cond:
            evict = unit.evict and error is None
            unit.evict = False
            if error is not None:
                unit.state, unit.error = State.FAILED, error
            else:
                shared.stats.bytes_read += nbytes
                shared.stats.read_seconds += seconds
                shared.stats.units_read += 1
                if not evict:                 # an evicted unit stays LOADING until it is given back
                    unit.state = State.READY
            shared.cond.notify_all()
        if evict:
            try:
                shared.give_back(unit)
            except OSError as exc:
                with shared.cond:
                    unit.state, unit.error = State.FAILED, exc
                    shared.cond.notify_all()


class Prefetcher:
    """One background thread reading units into memory within `pool` bytes, in the order they are requested."""

    def __init__(self, pager: Pager, pool: int) -> None:
        self._shared = _Shared(pager, pool)
        self._thread = threading.Thread(target=_worker, args=(self._shared,), daemon=True, name="qvl-ssd-prefetch")
        self._thread.start()
        weakref.finalize(self, _Shared.close, self._shared)
        weakref.finalize(self, pager.close)

    @property
    def pool(self) -> int:
        return self._shared.pool

    @property
    def held(self) -> int:
        return self._shared.held

    @property
    def stats(self) -> StreamStats:
        return self._shared.stats

    def close(self) -> None:
        self._shared.close()
        self._thread.join(timeout=5)

    def request(self, unit: Unit, force: bool = False) -> bool:
        """Queue `unit` for reading when the pool has room (or `force`); False when it had none. A unit already on
        its way keeps its place (a pending give-back is cancelled)."""
        s = self._shared
        with s.cond:
            if unit.state is not State.IDLE:
                unit.evict = False
                return True
            if not force and s.held and s.held + unit.nbytes > s.pool:
                return False
            unit.state, unit.error = State.QUEUED, None
            s.held += unit.nbytes
            s.stats.peak_held = max(s.stats.peak_held, s.held)
            s.queue.append(unit)
            s.cond.notify_all()
            return True

    def acquire(self, unit: Unit) -> None:
        """Wait until `unit` is in memory and mark it in use; CheckpointError when its read failed or the thread is
        gone (never waits forever)."""
        s = self._shared
        start = time.perf_counter()
        waited = False
        with s.cond:
            while True:
                if unit.state is State.IDLE:
                    self.request(unit, force=True)          # the condition's lock is re-entrant
                    continue
                if unit.state in (State.READY, State.IN_USE):
                    break
                if unit.state is State.FAILED:
                    error = unit.error
                    unit.state, unit.error = State.IDLE, None
                    s.held -= unit.nbytes
                    raise _read_error(unit, error)
                if not self._thread.is_alive():
                    raise CheckpointError(f"memory=ssd_stream: the prefetch thread stopped before {unit.name} was "
                                          "read", "start again; report this as a bug if it recurs")
                waited = True
                s.cond.wait(WAIT_S)
            unit.state = State.IN_USE
            if waited:
                s.stats.compute_waits += 1
                s.stats.wait_seconds += time.perf_counter() - start

    def release(self, unit: Unit) -> None:
        """Give `unit` back: now when it is in memory, after its read when it is being read, at once when queued."""
        s = self._shared
        with s.cond:
            if unit.state in (State.QUEUED, State.FAILED):
                unit.state, unit.error = State.IDLE, None
                s.held -= unit.nbytes
                s.cond.notify_all()
                return
            if unit.state is State.LOADING:
                unit.evict = True             # the thread gives it back once read (then it is IDLE)
                return
            if unit.state not in (State.READY, State.IN_USE):
                return
        try:
            self._shared.give_back(unit)
        except OSError as exc:
            raise _read_error(unit, exc) from exc


def _read_error(unit: Unit, error: BaseException | None) -> CheckpointError:
    paths = sorted({e.path for e in unit.residency.extents})
    reason = f"{type(error).__name__}: {error}" if error is not None else "unknown error"
    return CheckpointError(f"memory=ssd_stream could not read {unit.name} from {', '.join(paths)} ({reason})",
                           "the weights file changed, shrank or became unreadable while the model ran: restore it "
                           "(re-download the checkpoint, or delete the quantised cache entry) and start again")


class Stream:
    """Units computed in a fixed order, one at a time (taking a unit gives back any other still in use); cyclic
    streams read ahead across the end (the decoder: after the head, the next token's first streamed layer)."""

    def __init__(self, units: list[Unit], prefetcher: Prefetcher, *, cyclic: bool, ahead: int) -> None:
        self.units = units
        self.prefetcher = prefetcher
        self.cyclic = cyclic
        self.ahead = ahead

    def enter(self, index: int) -> None:
        unit = self.units[index]
        for other in self.units:
            if other is not unit and other.state is State.IN_USE:
                self.prefetcher.release(other)
        if not self.prefetcher.request(unit):        # the pool is full of units read ahead for another order
            self.quiesce()
            self.prefetcher.request(unit, force=True)
        self._read_ahead(index)
        self.prefetcher.acquire(unit)

    def leave(self, index: int) -> None:
        self.prefetcher.release(self.units[index])
        self._read_ahead(index)

    def start(self) -> None:
        """Read the first units ahead (before the stream's first unit runs)."""
        self._read_ahead(-1)

    def quiesce(self, in_use_too: bool = False) -> None:
        """Give back every unit read ahead (and, with `in_use_too`, the one still taken)."""
        for unit in self.units:
            if in_use_too or unit.state is not State.IN_USE:
                self.prefetcher.release(unit)

    def _read_ahead(self, index: int) -> None:
        n = len(self.units)
        for k in range(1, self.ahead + 1):
            j = index + k
            if self.cyclic:
                j %= n
            if j >= n or j == index % n or not self.prefetcher.request(self.units[j]):
                break


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def make_unit(name: str, tensors: Iterable[torch.Tensor], maps: list) -> Unit:
    """A unit over `tensors`; ConfigError when they are not read from a file (converted in memory)."""
    found = residency(tensors, maps)
    total = found.mapped + found.anonymous
    if total and found.mapped < FILE_BACKED_SHARE * total:
        raise ConfigError(f"memory=ssd_stream cannot leave {name} on disk: {found.anonymous / 2**20:.1f} of its "
                          f"{total / 2**20:.1f} MiB of weights live in memory, not mapped from the checkpoint or the "
                          "quantised cache (the kernels plugin or model.dtype converts them while loading)",
                          "use kernels=torch_native with the checkpoint's dtype, or a quantised kernels plugin with "
                          "its cache on, or memory=cpu")
    return Unit(name, found)


@dataclass
class Streaming:
    """The streams of one model, their prefetcher and the hooks that drive them."""

    prefetcher: Prefetcher
    decoder: Stream | None
    vision: Stream | None
    vision_rest: Unit | None
    handles: list = field(default_factory=list)

    @property
    def stats(self) -> StreamStats:
        return self.prefetcher.stats

    def units(self) -> list[Unit]:
        found = list(self.decoder.units) if self.decoder else []
        found += list(self.vision.units) if self.vision else []
        return found + ([self.vision_rest] if self.vision_rest else [])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.prefetcher.close()


def _pre(fn: Callable[[], None]) -> Callable[..., None]:
    return lambda module, args: fn()


def _post(fn: Callable[[], None]) -> Callable[..., None]:
    return lambda module, args, output: fn()


def attach_streaming(*, layers: list[tuple[int, nn.Module]], head: list[nn.Module],
                     tied_head: tuple[nn.Module, nn.Module] | None, vision: nn.Module | None,
                     vision_blocks: list[nn.Module], pool: int, ahead: int, drop_page_cache: bool,
                     pager_factory: Callable[[list[str], bool], Pager] = Pager) -> Streaming:
    """Hook streaming onto the modules that stay on disk.

    layers: (index, module) of the streamed decoder layers in order. head: the modules computing the output head
    (its row ranges, or the whole head), each streamed as a unit after the layers. tied_head: (embedding table,
    final norm) for a tied head computed from the table without a module of its own: taken when the final norm
    runs, given back when the next unit is taken. vision: the tower when it stays on disk (its blocks stream one by
    one, the rest is held while it runs)."""
    maps = file_mappings()
    decoder_units = [make_unit(f"decoder layer {i}", module_tensors(m), maps) for i, m in layers]
    names = ["the output head"] if len(head) == 1 else [f"output head rows part {k}" for k in range(len(head))]
    decoder_units += [make_unit(name, module_tensors(m), maps) for name, m in zip(names, head, strict=True)]
    if tied_head is not None:
        decoder_units.append(make_unit("the output head (the embedding table)", module_tensors(tied_head[0]), maps))
    block_units: list[Unit] = []
    rest: Unit | None = None
    if vision is not None:
        block_units = [make_unit(f"vision block {i}", module_tensors(b), maps) for i, b in enumerate(vision_blocks)]
        in_blocks = {t.data_ptr() for b in vision_blocks for t in module_tensors(b)}
        rest = make_unit("the vision tower's embeddings and mergers",
                         [t for t in module_tensors(vision) if t.data_ptr() not in in_blocks], maps)
    every = decoder_units + block_units + ([rest] if rest else [])
    # The plan counted bytes; the units hold whole pages: the pool is at least the page-rounded window.
    pool = max(pool, window_bytes([u.nbytes for u in decoder_units], ahead, cyclic=True),
               (rest.nbytes if rest else 0) + window_bytes([u.nbytes for u in block_units], ahead, cyclic=False))
    pager = pager_factory([e.path for u in every for e in u.residency.extents], drop_page_cache)
    for unit in every:                   # loading may have read them (checksums, quantising): start with none held
        pager.release(unit.residency.extents)
    prefetcher = Prefetcher(pager, pool)
    decoder = Stream(decoder_units, prefetcher, cyclic=True, ahead=ahead) if decoder_units else None
    blocks = Stream(block_units, prefetcher, cyclic=False, ahead=ahead) if block_units else None
    streaming = Streaming(prefetcher, decoder, blocks, rest)
    hooks = streaming.handles
    for k, module in enumerate([m for _, m in layers] + head):
        hooks.append(module.register_forward_pre_hook(_pre(lambda k=k: decoder.enter(k))))
        hooks.append(module.register_forward_hook(_post(lambda k=k: decoder.leave(k))))
    if tied_head is not None:
        assert decoder is not None
        k = len(decoder_units) - 1
        hooks.append(tied_head[1].register_forward_pre_hook(_pre(lambda: decoder.enter(k))))
    if vision is not None and rest is not None:
        def vision_start() -> None:
            if decoder is not None:
                decoder.quiesce(in_use_too=True)         # nothing of the decoder runs now: the pool serves the tower
            prefetcher.request(rest, force=True)
            if blocks is not None:
                blocks.start()
            prefetcher.acquire(rest)

        def vision_end() -> None:
            prefetcher.release(rest)
            if blocks is not None:
                blocks.quiesce()

        hooks.append(vision.register_forward_pre_hook(_pre(vision_start)))
        hooks.append(vision.register_forward_hook(_post(vision_end)))
        for k, block in enumerate(vision_blocks):
            hooks.append(block.register_forward_pre_hook(_pre(lambda k=k: blocks.enter(k))))
            hooks.append(block.register_forward_hook(_post(lambda k=k: blocks.leave(k))))
    if decoder is not None:
        decoder.start()
    return streaming
