"""First N decoder layers resident on the GPU, the rest computed on the CPU (llama.cpp -ngl style).

Streaming layers over a narrow PCIe link (MX150/MX250: PCIe 3.0 x4) is slower than computing them on the
CPU, so nothing moves per token: each layer (and its KV cache) lives where it computes, and only the hidden
state crosses. The planner puts the vision tower on the GPU first (prefill is compute bound), then as many leading
layers with their KV cache as the VRAM budget holds, then the head when every layer is there.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, fits


@dataclass(frozen=True)
class CudaPartialOptions:
    gpu_layers: int | None = None      # null: as many leading layers as the VRAM budget (memory.vram_budget_gb) holds


class CudaPartialMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "leading decoder layers on the GPU up to the VRAM budget, the rest on the CPU"
    Options = CudaPartialOptions
    mode = "cuda_partial"

    @classmethod
    def validate(cls, facts: RunFacts, options: CudaPartialOptions) -> list[str]:
        """Usable on a CUDA GPU with a VRAM budget, when what stays on the CPU fits the RAM budget."""
        reasons = facts.hardware.cuda_reasons()
        if reasons:
            return reasons
        if facts.memory_budgets.vram <= 0:
            return [f"no VRAM budget ({facts.memory_budgets.vram_source})"]
        return fits(facts, "cuda_partial", gpu_layers=options.gpu_layers)

    def planner_options(self) -> dict[str, object]:
        return {"gpu_layers": self.options.gpu_layers}
