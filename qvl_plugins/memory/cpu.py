"""Reference placement: everything in CPU RAM (weights mmap-backed when stored as used, paged from disk)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from torch.utils.hooks import RemovableHandle

from qvl_pipeline.memory_plan import GIB
from qvl_pipeline.slots import Fidelity, NoOptions, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, Placement, fits
from qvl_plugins.memory.paging import read_ahead, read_in
from qvl_plugins.memory.ram_guard import RamGuard


class CpuMemory(MemoryManager):
    fidelity = Fidelity.REFERENCE
    summary = "all weights and the KV cache in CPU RAM, the reference placement"
    mode = "cpu"
    resident_weights = True
    _guard: RemovableHandle | None = None

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        """Usable when the weights (in the chosen kernels' format), the KV cache for the context and the runtime
        fit the RAM budget."""
        return fits(facts, "cpu")

    def attach(self, layers: Sequence[nn.Module], placement: Placement) -> Placement:
        """Read the memory-mapped weights every request computes with (decoder layers, vision tower, final norm,
        head) into memory at load, so that the first request does not fault them in from disk; the embedding table
        is left mapped unless it is the head (a lookup touches a few rows), its file read ahead into the page cache
        so that a row first used mid-generation is not a disk read. With memory.ram_budget_gb set, the process's
        resident memory is checked after each step (ram_guard: over the budget, the slot moves down its chain)."""
        head, embed = getattr(layers, "head", None), getattr(layers, "embed", None)
        parts = [*layers, getattr(layers, "vision", None), getattr(layers, "norm", None),
                 head if head is not None else embed]
        try:
            read_in(p for p in parts if p is not None)
            if head is not None and embed is not None:
                read_ahead([embed])
        except OSError:             # read-ahead only: a file that cannot deliver fails where it is used, with its error
            pass
        budget = self.facts.memory_budgets.knobs.ram_budget_gb
        watched = getattr(layers, "norm", None)                   # runs once per step, after every decoder layer
        if watched is None and len(layers):
            watched = layers[len(layers) - 1]
        if budget is not None and watched is not None:
            self._guard = RamGuard(int(budget * GIB)).watch(watched)
        return placement

    def detach(self, layers: Sequence[nn.Module]) -> None:
        if self._guard is not None:
            self._guard.remove()
            self._guard = None
