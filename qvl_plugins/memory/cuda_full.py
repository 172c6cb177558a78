"""Everything on the GPU: the fastest placement when the weights fit in VRAM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_plugins.memory.budget import GIB, VRAM_RESERVE_GB


@dataclass(frozen=True)
class CudaFullOptions:
    vram_reserve_gb: float = VRAM_RESERVE_GB


class CudaFullMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "all weights and the KV cache on the GPU"
    Options = CudaFullOptions

    @classmethod
    def validate(cls, facts: RunFacts, options: CudaFullOptions) -> list[str]:
        hw = facts.hardware
        reasons = hw.cuda_reasons()
        if reasons:
            return reasons
        assert hw.gpu is not None
        need = facts.model.weight_bytes
        budget = (hw.gpu.vram_gb - options.vram_reserve_gb) * GIB
        if need > budget:
            return [f"{facts.model.stored_dtype} weights need {need / GIB:.2f} GiB; {hw.gpu.name} has "
                    f"{hw.gpu.vram_gb:.1f} GiB ({options.vram_reserve_gb:.1f} GiB kept free)"]
        return []

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        return Placement(vision="cuda", embed="cuda", head="cuda", layers=tuple("cuda" for _ in layer_bytes))

    def device(self) -> torch.device:
        return torch.device("cuda")
