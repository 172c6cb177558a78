"""First N decoder layers resident on the GPU, the rest computed on the CPU (llama.cpp -ngl style).

Streaming layers over a narrow PCIe link (MX150/MX250: PCIe 3.0 x4) is slower than computing them on the
CPU, so nothing moves per token: each layer (and its KV cache) lives where it computes, and only the hidden
state crosses.
"""

from __future__ import annotations

from dataclasses import dataclass

from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_plugins.memory.budget import GIB, VRAM_RESERVE_GB, layers_that_fit


@dataclass(frozen=True)
class CudaPartialOptions:
    vram_reserve_gb: float = VRAM_RESERVE_GB
    gpu_layers: int | None = None      # null: as many leading layers as fit in VRAM minus the reserve


class CudaPartialMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "leading decoder layers on the GPU up to the VRAM budget, the rest on the CPU"
    Options = CudaPartialOptions

    @classmethod
    def validate(cls, facts: RunFacts, options: CudaPartialOptions) -> list[str]:
        hw = facts.hardware
        reasons = hw.cuda_reasons()
        if reasons:
            return reasons
        assert hw.gpu is not None
        if hw.gpu.vram_gb - options.vram_reserve_gb <= 0:
            return [f"{hw.gpu.name} has {hw.gpu.vram_gb:.1f} GiB of VRAM, less than the "
                    f"{options.vram_reserve_gb:.1f} GiB reserve"]
        return []

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        assert self.hw.gpu is not None
        budget = int((self.hw.gpu.vram_gb - self.options.vram_reserve_gb) * GIB)
        forced = self.options.gpu_layers
        # The embedding table stays on the CPU (one row read per token); the head follows the last layer.
        count = forced if forced is not None else layers_that_fit(layer_bytes, vision_bytes, budget)
        count = max(0, min(count, len(layer_bytes)))
        layers = tuple("cuda" if i < count else "cpu" for i in range(len(layer_bytes)))
        head = "cuda" if count == len(layer_bytes) and budget >= sum(layer_bytes) + vision_bytes + head_bytes \
            else "cpu"
        return Placement(vision="cuda" if vision_bytes <= budget else "cpu", embed="cpu", head=head, layers=layers)
