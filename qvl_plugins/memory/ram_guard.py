"""The RAM budget at run time: with `memory.ram_budget_gb` set, a process that holds more than the budget (plus
RSS_TOLERANCE) after a forward pass raises MemoryBudgetExceeded; the runtime recovers from it as from a CUDA
out-of-memory (qvl_pipeline.runtime.recovery): the memory slot moves down its chain (`cpu` -> `ssd_stream`, which
leaves what the budget cannot hold on disk) and the step is retried from the preserved KV cache."""

from __future__ import annotations

import os
from dataclasses import dataclass

from torch import nn
from torch.utils.hooks import RemovableHandle

from qvl_pipeline.errors import MemoryBudgetExceeded
from qvl_pipeline.memory_plan import GIB
from qvl_plugins.kernels.quantize import trim_heap

# The plan's sizes are estimates (allocator slack, the runtime's own share): the bound for a run within a RAM
# budget is the budget + 15 %.
RSS_TOLERANCE = 0.15
_STATM = "/proc/self/statm"


def resident_bytes() -> int | None:
    """The process's resident memory now (Linux: /proc/self/statm), or None where it cannot be read."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class RamGuard:
    """Checks the process's resident memory against `budget` bytes (+ `tolerance`) after a module's forward."""

    budget: int
    tolerance: float = RSS_TOLERANCE

    @property
    def limit(self) -> int:
        return int(self.budget * (1 + self.tolerance))

    def check(self) -> None:
        """MemoryBudgetExceeded when the process holds more than `limit`, after handing the C heap's free pages back
        (memory the allocator kept after a step freed it is not held by the run)."""
        held = resident_bytes()
        if held is None or held <= self.limit:
            return
        trim_heap()
        held = resident_bytes()
        if held is not None and held > self.limit:
            raise MemoryBudgetExceeded(
                f"the process holds {held / GIB:.2f} GiB after a step, over memory.ram_budget_gb="
                f"{self.budget / GIB:g} GiB + {self.tolerance:.0%}")

    def watch(self, module: nn.Module) -> RemovableHandle:
        """Check after every forward of `module` (once per step when it is the model's final norm)."""
        return module.register_forward_hook(lambda *_: self.check())
