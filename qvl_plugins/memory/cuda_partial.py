"""First N decoder layers resident on the GPU, the rest computed on the CPU (llama.cpp -ngl style).

Streaming layers over a narrow PCIe link (MX150/MX250: PCIe 3.0 x4) is slower than computing them on the
CPU, so nothing moves per token: each layer lives where it computes, and only the hidden state crosses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots.base import Fidelity
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_plugins.memory.budget import GIB, layers_that_fit


class CudaPartialMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "leading decoder layers on the GPU up to the VRAM budget, the rest on the CPU"

    @classmethod
    def validate(cls, hw: HardwareProfile, cfg: Mapping[str, Any]) -> list[str]:
        reasons = hw.cuda_reasons()
        if reasons:
            return reasons
        assert hw.gpu is not None
        reserve = float(cfg.get("memory", {}).get("options", {}).get("vram_reserve_gb", 0.5))
        if hw.gpu.vram_gb - reserve <= 0:
            return [f"{hw.gpu.name} has {hw.gpu.vram_gb:.1f} GiB of VRAM, less than the {reserve:.1f} GiB reserve"]
        return []

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        assert self.hw.gpu is not None
        reserve = float(self.options.get("vram_reserve_gb", 0.5))
        budget = int((self.hw.gpu.vram_gb - reserve) * GIB)
        forced = self.options.get("gpu_layers")
        # The embedding table stays on the CPU (one row read per token); the head follows the last layer.
        count = int(forced) if forced is not None else layers_that_fit(layer_bytes, vision_bytes, budget)
        count = max(0, min(count, len(layer_bytes)))
        layers = tuple("cuda" if i < count else "cpu" for i in range(len(layer_bytes)))
        head = "cuda" if count == len(layer_bytes) and budget >= sum(layer_bytes) + vision_bytes + head_bytes \
            else "cpu"
        return Placement(vision="cuda" if vision_bytes <= budget else "cpu", embed="cpu", head=head, layers=layers)
