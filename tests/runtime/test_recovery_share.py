"""The pure helpers behind recovery from out-of-memory: a placement's GPU share, the default smaller share, and how
a placement change is described in the plan."""

from __future__ import annotations

from qvl_pipeline.slots import Placement
from qvl_pipeline.slots.memory_share import (
    gpu_bytes,
    layer_devices_summary,
    placement_changes,
    smaller_gpu_share,
)
from qvl_plugins.memory.cpu import CpuMemory
from tests.conftest import make_facts

SIZES = ([10] * 6, 100, 1000, 500)


def partial(gpu_layers: int, head: str = "cpu", vision: str = "cuda") -> Placement:
    return Placement(vision=vision, embed="cpu", head=head,
                     layers=tuple("cuda" if i < gpu_layers else "cpu" for i in range(6)))


def test_gpu_bytes_counts_what_is_not_on_the_cpu():
    assert gpu_bytes(partial(4), *SIZES) == 4 * 10 + 100
    assert gpu_bytes(partial(6, head="cuda"), *SIZES) == 60 + 100 + 500
    assert gpu_bytes(Placement("cpu", "cpu", "cpu", ("cpu",) * 6), *SIZES) == 0


def test_the_default_shrink_moves_the_trailing_half_of_the_gpu_layers_then_the_rest():
    step = smaller_gpu_share(partial(6, head="cuda"))
    assert step == partial(3)                                     # layers 3-5 and the head after them
    shares = [step]
    while (step := smaller_gpu_share(step)) is not None:
        shares.append(step)
    assert [s.layers.count("cuda") for s in shares] == [3, 1, 0, 0]            # 6 -> 3 -> 1 -> 0, then vision
    assert shares[-1] == Placement("cpu", "cpu", "cpu", ("cpu",) * 6)            # the vision tower goes last
    amounts = [gpu_bytes(s, *SIZES) for s in shares]
    assert amounts == sorted(amounts, reverse=True) and len(set(amounts)) == len(amounts)   # strictly smaller


def test_a_cpu_placement_has_no_smaller_share_and_the_default_hooks_do_nothing():
    memory = CpuMemory(make_facts())
    placement = memory.place(*SIZES)
    assert memory.shrink(placement) is None
    assert memory.attach([], placement) is placement
    memory.detach([])


def test_changes_and_layer_summaries_read_as_sentences():
    assert placement_changes(partial(6, head="cuda"), partial(3)) == "decoder layers 3-5 cuda -> cpu; head cuda -> cpu"
    assert placement_changes(partial(3), partial(3)) == "nothing moved"
    assert layer_devices_summary(partial(4).layers) == "layers 0-3 on cuda; layers 4-5 on cpu"
    assert layer_devices_summary(("cpu", "cuda", "cpu")) == "layers 0, 2 on cpu; layers 1 on cuda"
