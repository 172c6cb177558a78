"""The ssd_stream prefetcher's bookkeeping with a fake pager (no files): read-ahead within the pool, give-back of a
unit being read, failures surfacing once, a stopped thread never waited on forever; the head split by rows."""

from __future__ import annotations

import gc
import os
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.slots.memory import ModelParts
from qvl_plugins.memory.paging import Extent, Residency
from qvl_plugins.memory.row_chunks import ChunkedHead, TiedRows, row_slice, split_head, splits_exactly
from qvl_plugins.memory.streaming import Prefetcher, State, Stream, Unit
from tests.conftest import make_facts


class FakePager:
    """Records loads and releases; `gate` holds a load until set; `fail` names units whose load raises."""

    def __init__(self):
        self.loaded, self.released = [], []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[int] = set()

    def load(self, extents):
        self.gate.wait(5)
        (e,) = extents
        if e.address in self.fail:
            raise OSError(14, "Bad address")
        self.loaded.append(e.address)
        return e.length

    def release(self, extents):
        self.released.extend(e.address for e in extents)

    def close(self):
        pass


def unit(i: int, size: int = 100) -> Unit:
    return Unit(f"unit {i}", Residency((Extent(i, size, "/fake", 0),), size, 0))


def wait_for(predicate, timeout=5.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.005)


def test_a_cyclic_stream_reads_one_ahead_within_the_pool():
    pager = FakePager()
    prefetcher = Prefetcher(pager, pool=200)
    units = [unit(i) for i in range(4)]
    stream = Stream(units, prefetcher, cyclic=True, ahead=1)
    stream.start()
    for _token in range(2):
        for i in range(4):
            stream.enter(i)
            assert units[i].state is State.IN_USE and prefetcher.held <= 200
            stream.leave(i)
    wait_for(lambda: units[0].state is State.READY)     # the next token's first unit, read across the end
    assert prefetcher.stats.peak_held <= 200
    assert pager.loaded.count(0) == 3 and pager.loaded.count(3) == 2
    prefetcher.close()


def test_a_unit_given_back_while_being_read_is_released_after_the_read():
    pager = FakePager()
    pager.gate.clear()
    prefetcher = Prefetcher(pager, pool=1000)
    u = unit(7)
    prefetcher.request(u)
    wait_for(lambda: u.state is State.LOADING)
    prefetcher.release(u)
    pager.gate.set()
    wait_for(lambda: u.state is State.IDLE)
    assert pager.released == [7] and prefetcher.held == 0
    prefetcher.close()


def test_a_failed_read_raises_once_then_reads_again():
    pager = FakePager()
    pager.fail = {3}
    prefetcher = Prefetcher(pager, pool=1000)
    u = unit(3)
    prefetcher.request(u)
    with pytest.raises(CheckpointError, match=r"could not read unit 3 from /fake \(OSError: \[Errno 14\] Bad"):
        prefetcher.acquire(u)
    assert u.state is State.IDLE and prefetcher.held == 0
    pager.fail = set()
    prefetcher.acquire(u)                      # requested again and read
    assert u.state is State.IN_USE
    prefetcher.close()


def test_waiting_on_a_stopped_thread_is_an_error_not_a_hang():
    pager = FakePager()
    pager.gate.clear()
    prefetcher = Prefetcher(pager, pool=1000)
    prefetcher.close()                         # the thread is gone before it read anything
    u = unit(1)
    prefetcher.request(u)
    start = time.monotonic()
    with pytest.raises(CheckpointError, match="prefetch thread stopped"):
        prefetcher.acquire(u)
    assert time.monotonic() - start < 5


def test_an_unreferenced_prefetcher_stops_its_thread():
    before = {t.ident for t in threading.enumerate() if t.name == "qvl-ssd-prefetch"}
    prefetcher = Prefetcher(FakePager(), pool=10)
    ident = next(t.ident for t in threading.enumerate() if t.name == "qvl-ssd-prefetch" and t.ident not in before)
    del prefetcher
    gc.collect()
    wait_for(lambda: ident not in {t.ident for t in threading.enumerate()})


# --- the head in row ranges ----------------------------------------------------------------------------------------

def test_row_slices_of_a_linear_compute_its_rows():
    torch.manual_seed(0)
    linear = nn.Linear(64, 300, bias=True)
    piece = row_slice(linear, 128, 256)
    x = torch.randn(3, 64)
    assert piece.out_features == 128 and piece.weight.data_ptr() == linear.weight[128].data_ptr()
    assert torch.equal(piece(x), linear(x)[:, 128:256])
    piece.register_forward_hook(lambda *a: None)
    assert not linear._forward_hooks                          # the piece has its own hook tables
    assert splits_exactly(linear, 64)


def test_split_head_is_exact_for_a_linear_and_a_tied_table():
    torch.manual_seed(1)
    linear = nn.Linear(64, 1000, bias=False)
    x = torch.randn(2, 64)
    split = split_head(linear, nn.Embedding(1, 64), 3)
    assert isinstance(split, ChunkedHead) and len(split.pieces) == 3
    assert torch.equal(split(x), linear(x))
    table = nn.Embedding(1000, 64)
    tied = split_head(None, table, 4)
    assert torch.equal(tied(x), TiedRows(table.weight.detach())(x))
    assert split_head(linear, table, 1) is None                # one piece: nothing to split
    bf16 = nn.Embedding(1000, 64).to(torch.bfloat16)           # a bf16 table under fp32 activations, as unchunked
    got = split_head(None, bf16, 4)(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, F.linear(x.to(torch.bfloat16), bf16.weight.detach()).float())


class RowsTwisted(nn.Module):
    """A head whose per-row tensor is laid out [in, out]: slicing its first dimension would be wrong."""

    def __init__(self):
        super().__init__()
        self.out_features, self.in_features = 256, 256
        self.weight_t = nn.Parameter(torch.randn(256, 256), requires_grad=False)

    def forward(self, x):
        return x @ self.weight_t


def test_a_head_that_does_not_split_exactly_stays_whole():
    assert split_head(RowsTwisted(), nn.Embedding(1, 256), 2) is None


def test_read_in_reads_mapped_weights_and_the_cpu_plugin_reads_its_parts_at_attach(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from qvl_plugins.memory import cpu, paging

    if paging.supported():
        pytest.skip(f"page residency not managed here: {paging.supported()}")
    save_file({"w": torch.randn(256, 1024)}, str(tmp_path / "w.safetensors"))
    mapped = nn.Linear(1024, 256, bias=False)
    mapped.weight = nn.Parameter(load_file(str(tmp_path / "w.safetensors"))["w"], requires_grad=False)
    anonymous = nn.Linear(8, 8)
    assert paging.read_in([mapped]) >= 256 * 1024 * 4                  # the file pages backing the weight
    assert paging.read_in([anonymous]) == 0                               # nothing mapped: nothing to read
    seen: list[list[nn.Module]] = []
    monkeypatch.setattr(cpu, "read_in", lambda modules: seen.append(list(modules)) or 0)
    parts = ModelParts(layers=(mapped,), vision=anonymous, embed=nn.Embedding(4, 8), head=None)
    placement = object()
    assert cpu.CpuMemory(make_facts()).attach(parts, placement) is placement
    assert seen[0][:2] == [mapped, anonymous] and seen[0][-1] is parts.embed   # tied head: the table is read too



def _cached_fraction(path) -> float:
    """Fraction of the file's pages in the page cache (mincore over a private mapping of the file)."""
    import ctypes
    import mmap

    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
    size = len(mm)
    pages = -(-size // mmap.PAGESIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    first = ctypes.c_char.from_buffer(mm)
    try:
        flags = ctypes.create_string_buffer(pages)
        assert libc.mincore(ctypes.addressof(first), size, flags) == 0, ctypes.get_errno()
        return sum(b & 1 for b in flags.raw) / pages
    finally:
        del first
        mm.close()


def test_read_ahead_fills_the_page_cache_without_mapping_and_the_cpu_plugin_reads_ahead_an_untied_table(
        tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from qvl_plugins.memory import cpu, paging

    if paging.supported():
        pytest.skip(f"page residency not managed here: {paging.supported()}")
    path = tmp_path / "table.safetensors"
    save_file({"table": torch.zeros(4096, 4096)}, str(path))      # 64 MiB: many read-ahead windows (128 KiB-8 MiB)
    table = nn.Embedding(4096, 4096)
    table.weight = nn.Parameter(load_file(str(path))["table"], requires_grad=False)
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())                     # written back, so that the page cache can drop it
    paging.drop_file_cache(path)
    assert _cached_fraction(path) < 0.5                                     # dropped
    assert paging.read_ahead([table]) >= 4096 * 4096 * 4
    # the whole table, not one read-ahead window (the reads complete after the thread has asked for them)
    wait_for(lambda: _cached_fraction(path) > 0.95, timeout=30)
    assert paging.read_ahead([nn.Linear(8, 8)]) == 0                        # nothing mapped: nothing to ask for
    ahead: list[list[nn.Module]] = []
    monkeypatch.setattr(cpu, "read_in", lambda modules: list(modules) and 0)
    monkeypatch.setattr(cpu, "read_ahead", lambda modules: ahead.append(list(modules)) or 0)
    plugin = cpu.CpuMemory(make_facts())
    head = nn.Linear(8, 4, bias=False)
    plugin.attach(ModelParts(layers=(), vision=None, embed=table, head=head), object())
    plugin.attach(ModelParts(layers=(), vision=None, embed=table, head=None), object())
    assert ahead == [[table]]                     # an untied table is read ahead; a tied one is read in (above)
