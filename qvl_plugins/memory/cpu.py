"""Reference placement: everything in CPU RAM (weights mmap-backed when stored as used, paged from disk)."""

from __future__ import annotations

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.memory import MemoryManager, Placement


class CpuMemory(MemoryManager):
    fidelity = Fidelity.REFERENCE
    summary = "all weights and the KV cache in CPU RAM, the reference placement"

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        return Placement(vision="cpu", embed="cpu", head="cpu", layers=tuple("cpu" for _ in layer_bytes))
