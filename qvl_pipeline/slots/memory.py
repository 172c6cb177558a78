"""The memory slot: where each part of the model lives (GPU, CPU RAM, SSD) and how it moves."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qvl_pipeline.slots.base import Plugin


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

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_memory

        check_memory(self, reference)
