"""Every decoder layer computes on the GPU while its large weights live in pinned CPU RAM: a side CUDA stream copies
layer i+1's weights while layer i computes (an event orders each copy before its use), so VRAM holds about two
layers' weights, the small per-layer tensors (norms), the parts that fit (head, embeddings, vision tower) and the KV
cache.

When it pays (the rule `validate` applies): decode reads every weight once per token. Streamed, each token moves
every layer's weights over the host link, ≈ weight bytes / gpu.pcie_gb_s (the GPU's maths hides behind the copies);
computed on the CPU instead (cuda_partial's CPU layers, or memory=cpu), the CPU reads the same bytes from RAM,
≈ weight bytes / cpu.memory_bandwidth_gb_s (decode is bandwidth bound). So streaming is admitted only when
pcie_gb_s ≥ min_speedup × memory_bandwidth_gb_s: PCIe 5.0 x16 (~50 GB/s) against dual-channel DDR4 (~40 GB/s), not a
laptop's PCIe 3.0 x4 (3.9 GB/s) against 42.7 GB/s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import nn

from qvl_pipeline.slots import Fidelity, RunFacts
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_plugins.memory.budget import GIB, VRAM_RESERVE_GB

STREAMED_DEVICE = "cuda"
LAYERS_IN_FLIGHT = 2         # the layer computing and the next one being copied


@dataclass(frozen=True)
class CudaOffloadStreamOptions:
    vram_reserve_gb: float = VRAM_RESERVE_GB
    min_speedup: float = 1.0        # stream only when pcie_gb_s ≥ min_speedup × the CPU's memory bandwidth
    stream_min_bytes: int = 65536   # tensors at least this large stream; smaller ones (norms) stay on the GPU

    def __post_init__(self) -> None:
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0, got {self.min_speedup}")
        if self.stream_min_bytes < 0:
            raise ValueError(f"stream_min_bytes must be ≥ 0, got {self.stream_min_bytes}")


def streaming_reasons(pcie_gb_s: float, cpu_gb_s: float, min_speedup: float, layer_bytes: int,
                      vram_budget_bytes: float) -> list[str]:
    """Why streaming layers over the host link would not beat computing them on the CPU, or would not fit (pure):
    the link must carry at least `min_speedup` × the CPU's memory bandwidth, and two layers must fit in VRAM."""
    reasons = []
    if pcie_gb_s <= 0:
        reasons.append("the hardware profile states no gpu.pcie_gb_s (host link bandwidth), so streaming cannot be "
                       "shown to beat computing on the CPU; set hardware.gpu.pcie_gb_s")
    if cpu_gb_s <= 0:
        reasons.append("the CPU's memory bandwidth is unknown, so streaming cannot be shown to beat computing on the "
                       "CPU; add hardware.measure=true or set hardware.cpu.memory_bandwidth_gb_s")
    if pcie_gb_s > 0 and cpu_gb_s > 0 and pcie_gb_s < min_speedup * cpu_gb_s:
        reasons.append(f"the host link ({pcie_gb_s:g} GB/s) is slower than {min_speedup:g} × the CPU's memory "
                       f"bandwidth ({cpu_gb_s:g} GB/s): decode streams every layer's weights over the link for each "
                       f"token, so computing those layers on the CPU is {cpu_gb_s / pcie_gb_s:.1f}x faster")
    if LAYERS_IN_FLIGHT * layer_bytes > vram_budget_bytes:
        reasons.append(f"{LAYERS_IN_FLIGHT} decoder layers ({LAYERS_IN_FLIGHT * layer_bytes / GIB:.2f} GiB) do not "
                       f"fit in the {max(0.0, vram_budget_bytes) / GIB:.2f} GiB of VRAM left after the reserve")
    return reasons


def resident_parts(vram_budget_bytes: float, layer_bytes: Sequence[int], vision_bytes: int, embed_bytes: int,
                   head_bytes: int) -> dict[str, bool]:
    """Which fixed parts stay on the GPU (pure): the head, then the embeddings, then the vision tower, each while it
    fits beside the layers in flight."""
    left = vram_budget_bytes - LAYERS_IN_FLIGHT * max(layer_bytes, default=0)
    resident = {}
    for part, size in (("head", head_bytes), ("embed", embed_bytes), ("vision", vision_bytes)):
        resident[part] = size <= left
        left -= size if resident[part] else 0
    return resident


# ---- the streaming mechanics (the copier is chosen once, at attach) ------------------------------------------------

class Copier(Protocol):
    """Starts copies of a layer's home tensors to the compute device and hands them over when they are done."""

    def start(self, tensors: Sequence[torch.Tensor]) -> Any: ...

    def finish(self, ticket: Any) -> list[torch.Tensor]: ...


class SideStreamCopier:
    """Copies on a side CUDA stream from pinned memory; the compute stream waits on an event before using them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def start(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], torch.cuda.Event]:
        with torch.cuda.stream(self.stream):
            copies = [t.to(self.device, non_blocking=True) for t in tensors]
            done = torch.cuda.Event()
            done.record(self.stream)
        return copies, done

    def finish(self, ticket: tuple[list[torch.Tensor], torch.cuda.Event]) -> list[torch.Tensor]:
        copies, done = ticket
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        for t in copies:                      # allocated on the side stream, used on the compute stream
            t.record_stream(compute)
        return copies


class ImmediateCopier:
    """Copies at once on the current stream (the CPU-side tests of the mechanics)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(self.device, copy=True) for t in tensors]

    def finish(self, ticket: list[torch.Tensor]) -> list[torch.Tensor]:
        return ticket


@dataclass
class HomeTensor:
    """A large parameter or buffer of a layer whose storage lives in CPU RAM between uses."""

    module: nn.Module
    name: str
    is_parameter: bool
    home: torch.Tensor

    def point_at(self, tensor: torch.Tensor) -> None:
        if self.is_parameter:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


def _large_tensors(layer: nn.Module, min_bytes: int) -> list[tuple[nn.Module, str, bool, torch.Tensor]]:
    found = []
    for module in layer.modules():
        for is_parameter, table in ((True, module._parameters), (False, module._buffers)):
            for name, t in table.items():
                if t is not None and t.numel() * t.element_size() >= min_bytes:
                    found.append((module, name, is_parameter, t))
    return found


class LayerStreamer:
    """Moves each layer to the compute device (its own move logic runs, one layer at a time), then sends its large
    tensors home to (pinned) CPU RAM; around each layer's forward the copies are swapped in, the next layer's copy
    already under way, and swapped out again after it."""

    def __init__(self, layers: Sequence[nn.Module], device: torch.device, copier: Copier, min_bytes: int,
                 pin: bool) -> None:
        self.copier = copier
        self.homes: list[list[HomeTensor]] = []
        self.pending: dict[int, Any] = {}
        self.handles: list[Any] = []
        for i, layer in enumerate(layers):
            layer.to(device)
            homes = []
            for module, name, is_parameter, t in _large_tensors(layer, min_bytes):
                home = t.detach().to("cpu", copy=True)
                homes.append(HomeTensor(module, name, is_parameter, home.pin_memory() if pin else home))
                homes[-1].point_at(homes[-1].home)
            self.homes.append(homes)
            self.handles.append(layer.register_forward_pre_hook(self._before(i)))
            self.handles.append(layer.register_forward_hook(self._after(i)))

    def _copy(self, i: int) -> Any:
        return self.copier.start([h.home for h in self.homes[i]])

    def _before(self, i: int) -> Callable[..., None]:
        def bring_in(module: nn.Module, args: Any) -> None:
            ticket = self.pending.pop(i) if i in self.pending else self._copy(i)
            for h, tensor in zip(self.homes[i], self.copier.finish(ticket), strict=True):
                h.point_at(tensor)
            following = (i + 1) % len(self.homes)           # the last layer prefetches the first for the next step
            if following not in self.pending:
                self.pending[following] = self._copy(following)
        return bring_in

    def _after(self, i: int) -> Callable[..., None]:
        def send_home(module: nn.Module, args: Any, output: Any) -> None:
            for h in self.homes[i]:
                h.point_at(h.home)
        return send_home

    def close(self) -> None:
        """Remove the hooks and leave every large tensor at home (CPU RAM), also after a step failed mid-layer."""
        for handle in self.handles:
            handle.remove()
        self.handles, self.pending = [], {}
        for homes in self.homes:
            for h in homes:
                h.point_at(h.home)


class CudaOffloadStreamMemory(MemoryManager):
    fidelity = Fidelity.EXACT
    summary = ("every decoder layer computes on the GPU, its weights streamed from pinned RAM one layer ahead on a "
               "side CUDA stream: for models larger than VRAM on a host link faster than the CPU's RAM")
    Options = CudaOffloadStreamOptions

    def __init__(self, facts: RunFacts, options: CudaOffloadStreamOptions | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self.streamer: LayerStreamer | None = None

    @classmethod
    def validate(cls, facts: RunFacts, options: CudaOffloadStreamOptions) -> list[str]:
        hw = facts.hardware
        reasons = hw.cuda_reasons()
        if reasons:
            return reasons
        assert hw.gpu is not None
        layer_bytes = facts.model.params.per_layer * facts.model.bytes_per_param
        return streaming_reasons(hw.gpu.pcie_gb_s, hw.cpu.memory_bandwidth_gb_s, options.min_speedup, layer_bytes,
                                 cls._budget(facts, options))

    @staticmethod
    def _budget(facts: RunFacts, options: CudaOffloadStreamOptions) -> float:
        gpu = facts.hardware.gpu
        return 0.0 if gpu is None else (gpu.vram_gb - options.vram_reserve_gb) * GIB

    def place(self, layer_bytes: list[int], vision_bytes: int, embed_bytes: int, head_bytes: int) -> Placement:
        """The layers stay in CPU RAM (`attach` streams them); the head, embeddings and vision tower go to the GPU
        while they fit beside the layers in flight."""
        resident = resident_parts(self._budget(self.facts, self.options), layer_bytes, vision_bytes, embed_bytes,
                                  head_bytes)
        on = {part: STREAMED_DEVICE if fits else "cpu" for part, fits in resident.items()}
        return Placement(vision=on["vision"], embed=on["embed"], head=on["head"],
                         layers=tuple("cpu" for _ in layer_bytes))

    def attach(self, layers: Sequence[nn.Module], placement: Placement) -> Placement:
        device = torch.device(STREAMED_DEVICE)
        self.streamer = LayerStreamer(layers, device, SideStreamCopier(device), self.options.stream_min_bytes,
                                      pin=True)
        return replace(placement, layers=tuple(STREAMED_DEVICE for _ in layers))

    def detach(self, layers: Sequence[nn.Module]) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    def shrink(self, placement: Placement) -> Placement | None:
        """Two layers in flight is already the smallest share: after an out-of-memory the slot moves down its chain."""
        return None
