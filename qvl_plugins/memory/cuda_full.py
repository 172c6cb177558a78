"""Everything on the GPU: the fastest placement when the weights fit in VRAM."""

from __future__ import annotations

import torch

from qvl_pipeline.slots import Fidelity, NoOptions, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, fits


class CudaFullMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = "all weights and the KV cache on the GPU"
    mode = "cuda_full"

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        """Usable on a CUDA GPU whose VRAM budget holds every weight and the KV cache for the context."""
        return facts.hardware.cuda_reasons() or fits(facts, "cuda_full")

    def device(self) -> torch.device:
        return torch.device("cuda")
