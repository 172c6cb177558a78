"""Everything on the GPU: the fastest placement when the weights fit in VRAM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.slots.base import Fidelity
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_plugins.memory.budget import GIB, model_weight_bytes


def cuda_reasons(hw: HardwareProfile) -> list[str]:
    """Why CUDA cannot be used on `hw` (empty when it can)."""
    if hw.gpu is None:
        return ["needs a CUDA GPU; this machine has none usable by torch"]
    if hw.gpu.torch_has_kernels is False:
        return [f"the installed torch has no kernels for {hw.gpu.name} (sm_{hw.gpu.sm}); for Pascal install a "
                "CUDA 12.6 build of torch (CUDA 12.8+ wheels dropped sm_60/61)"]
    return []


class CudaFullMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "all weights and the KV cache on the GPU"

    @classmethod
    def validate(cls, hw: HardwareProfile, cfg: Mapping[str, Any]) -> list[str]:
        reasons = cuda_reasons(hw)
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
