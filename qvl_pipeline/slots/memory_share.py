"""The GPU share of a placement and the default way to shrink it after an out-of-memory (pure functions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qvl_pipeline.slots.memory import Placement

CPU = "cpu"


def on_gpu(device: str) -> bool:
    """Whether a placement's device string names an accelerator (anything but the CPU)."""
    return torch.device(device).type != CPU


def gpu_bytes(placement: Placement, layer_bytes: Sequence[int], vision_bytes: int, embed_bytes: int,
              head_bytes: int) -> int:
    """Bytes of weights the placement keeps off the CPU."""
    parts = [*zip(placement.layers, layer_bytes, strict=True), (placement.vision, vision_bytes),
             (placement.embed, embed_bytes), (placement.head, head_bytes)]
    return sum(size for device, size in parts if on_gpu(device))


def smaller_gpu_share(placement: Placement) -> Placement | None:
    """The placement with the trailing half of its GPU decoder layers (and the head after them) on the CPU; with
    no decoder layer on a GPU, the vision tower, embeddings and head on the CPU; None when nothing is on a GPU."""
    from qvl_pipeline.slots.memory import Placement

    gpu = [i for i, device in enumerate(placement.layers) if on_gpu(device)]
    if gpu:
        moved = set(gpu[len(gpu) // 2:])
        layers = tuple(CPU if i in moved else device for i, device in enumerate(placement.layers))
        head = placement.head if on_gpu(layers[-1]) else CPU        # the head follows the last layer
        return Placement(placement.vision, placement.embed, head, layers)
    if any(on_gpu(d) for d in (placement.vision, placement.embed, placement.head)):
        return Placement(CPU, CPU, CPU, placement.layers)
    return None


def _spans(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for i in indices:
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)


def layer_devices_summary(layers: Sequence[str]) -> str:
    """('cuda', 'cuda', 'cpu') -> 'layers 0-1 on cuda, 2 on cpu' (in order of first appearance)."""
    by_device: dict[str, list[int]] = {}
    for i, device in enumerate(layers):
        by_device.setdefault(str(device), []).append(i)
    return "; ".join(f"layers {_spans(idx)} on {device}" for device, idx in by_device.items()) or "no layers"


def placement_changes(old: Placement, new: Placement) -> str:
    """What moved between two placements, e.g. 'decoder layers 14-27 cuda -> cpu; head cuda -> cpu'."""
    moves: dict[tuple[str, str], list[int]] = {}
    for i, (a, b) in enumerate(zip(old.layers, new.layers, strict=True)):
        if a != b:
            moves.setdefault((a, b), []).append(i)
    parts = [f"decoder layers {_spans(idx)} {a} -> {b}" for (a, b), idx in moves.items()]
    parts += [f"{name} {a} -> {b}" for name, a, b in (("vision tower", old.vision, new.vision),
                                                       ("embeddings", old.embed, new.embed),
                                                       ("head", old.head, new.head)) if a != b]
    return "; ".join(parts) or "nothing moved"
