"""Everything on the GPU: the fastest placement when the weights fit in VRAM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots.base import Fidelity
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_plugins.memory.budget import GIB, model_weight_bytes


class CudaFullMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "all weights and the KV cache on the GPU"

    @classmethod
    def validate(cls, hw: HardwareProfile, cfg: Mapping[str, Any]) -> list[str]:
        reasons = hw.cuda_reasons()
        if reasons:
            return reasons
        assert hw.gpu is not None
        reserve = float(cfg.get("memory", {}).get("options", {}).get("vram_reserve_gb", 0.5))
        need = model_weight_bytes(cfg)
        budget = (hw.gpu.vram_gb - reserve) * GIB
        if need is not None and need > budget:
            return [f"weights need {need / GIB:.2f} GiB; {hw.gpu.name} has {hw.gpu.vram_gb:.1f} GiB "
                    f"({reserve:.1f} GiB kept free)"]
        return []

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        return Placement(vision="cuda", embed="cuda", head="cuda", layers=tuple("cuda" for _ in layer_bytes))

    def device(self) -> torch.device:
        return torch.device("cuda")
