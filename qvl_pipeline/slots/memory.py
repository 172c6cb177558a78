"""The memory slot: where each part of the model lives (GPU, CPU RAM, SSD) and how it moves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qvl_pipeline.slots.base import Plugin
from qvl_pipeline.slots.memory_share import smaller_gpu_share


@dataclass(frozen=True)
class Placement:
    """Device of the vision tower, of the embeddings/head and of each decoder layer."""

    vision: str
    embed: str
    head: str
    layers: tuple[str, ...]

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for dev in self.layers:
            counts[dev] = counts.get(dev, 0) + 1
        per_dev = ", ".join(f"{n} on {dev}" for dev, n in counts.items())
        return f"vision on {self.vision}, embeddings on {self.embed}, head on {self.head}; layers: {per_dev}"


class MemoryManager(Plugin):
    """Plans placement from the model's per-part sizes and the machine's budgets."""

    slot = "memory"
    reference = "cpu"

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        raise NotImplementedError

    def device(self) -> torch.device:
        """The device where requests start (inputs, sampler)."""
        return torch.device("cpu")

    # ---- at run time (defaults: nothing moves while running; see qvl_pipeline/runtime/recovery.py) -------------
    def attach(self, layers: Sequence[torch.nn.Module], placement: Placement) -> Placement:
        """Called once the parts sit where `place` said: a plugin that moves weights while running (streaming)
        hooks into the decoder layers here. Returns the placement as the layers compute (their KV caches go there)."""
        return placement

    def detach(self, layers: Sequence[torch.nn.Module]) -> None:
        """Undo `attach` before the placement changes (after an out-of-memory): weights back where `place` put
        them, hooks removed."""

    def shrink(self, placement: Placement) -> Placement | None:
        """After an out-of-memory (CUDA, or a MemoryBudgetExceeded this plugin raised): a placement with a smaller
        GPU share than the running `placement`, or None when there is none (the slot then moves down its chain).
        Default: the trailing half of the GPU decoder layers go to the CPU, then the vision tower and head."""
        return smaller_gpu_share(placement)

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_memory

        check_memory(self, reference)
