"""Reference placement: everything in CPU RAM (weights mmap-backed when stored as used, paged from disk)."""

from __future__ import annotations

from qvl_pipeline.slots import Fidelity, NoOptions, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, fits


class CpuMemory(MemoryManager):
    fidelity = Fidelity.REFERENCE
    summary = "all weights and the KV cache in CPU RAM, the reference placement"
    mode = "cpu"

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        """Usable when the weights (in the chosen kernels' format), the KV cache for the context and the runtime
        fit the RAM budget."""
        return fits(facts, "cpu")
