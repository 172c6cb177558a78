"""Every decoder layer computes on the GPU while the large weights of the layers that do not fit in VRAM live in
pinned CPU RAM: a side CUDA stream copies layer i+1's weights while layer i computes (an event orders each copy
before its use).

What stays in VRAM is sized by the memory planner (mode `cuda_offload_stream` in qvl_pipeline.memory_plan) from the
same VRAM budget every memory plugin uses (memory.vram_budget_gb, else the GPU's VRAM less the CUDA context's
reserve): first every layer's KV cache and the window of layers in flight (two copies of the largest streamed
layer); then, while they fit, the output head, the leading layers (kept resident, so fewer bytes cross the link per
token), the vision tower and the embeddings. When even the KV cache and the window do not fit, the plugin is refused
with the numbers and the smallest fix (a smaller context, a smaller weight format, a larger budget).

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
from qvl_pipeline.slots.memory import MemoryManager, Placement, fits
from qvl_pipeline.slots.memory_share import CPU, on_gpu

STREAMED_DEVICE = "cuda"


@dataclass(frozen=True)
class CudaOffloadStreamOptions:
    min_speedup: float = 1.0        # stream only when pcie_gb_s ≥ min_speedup × the CPU's memory bandwidth
    stream_min_bytes: int = 65536   # tensors at least this large stream; smaller ones (norms) stay on the GPU
    resident_layers: int | None = None   # leading layers kept in VRAM; null: as many as the VRAM budget holds

    def __post_init__(self) -> None:
        if self.min_speedup <= 0:
            raise ValueError(f"min_speedup must be > 0, got {self.min_speedup}")
        if self.stream_min_bytes < 0:
            raise ValueError(f"stream_min_bytes must be ≥ 0, got {self.stream_min_bytes}")
        if self.resident_layers is not None and self.resident_layers < 0:
            raise ValueError(f"resident_layers must be ≥ 0 or null, got {self.resident_layers}")


def streaming_reasons(pcie_gb_s: float, cpu_gb_s: float, min_speedup: float) -> list[str]:
    """Why streaming layers over the host link would not beat computing them on the CPU (pure): the link must carry
    at least `min_speedup` × the CPU's memory bandwidth. (Whether the window fits is the planner's check.)"""
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
    return reasons


def smaller_offload_share(placement: Placement) -> Placement | None:
    """The placement (as `place` made it: resident layers on the GPU, streamed ones at home on the CPU) with the
    trailing half of its resident layers streamed instead; with none resident, the head, embeddings and vision tower
    on the CPU; None when only the window and the KV caches are left on the GPU (pure)."""
    resident = [i for i, device in enumerate(placement.layers) if on_gpu(device)]
    if resident:
        streamed = set(resident[len(resident) // 2:])
        return replace(placement, layers=tuple(CPU if i in streamed else d for i, d in enumerate(placement.layers)),
                       plan=None)
    if any(on_gpu(d) for d in (placement.vision, placement.embed, placement.head)):
        return replace(placement, vision=CPU, embed=CPU, head=CPU, plan=None)
    return None


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

    mode = "cuda_offload_stream"

    def __init__(self, facts: RunFacts, options: CudaOffloadStreamOptions | None = None, *, name: str = "") -> None:
        super().__init__(facts, options, name=name)
        self.streamer: LayerStreamer | None = None
        self.placed: Placement | None = None         # the placement attach streamed from (what shrink shrinks) ...
        self.running: Placement | None = None        # ... and what attach returned (every layer on the GPU)

    @classmethod
    def validate(cls, facts: RunFacts, options: CudaOffloadStreamOptions) -> list[str]:
        """Usable on a CUDA GPU whose host link beats the CPU's RAM, when the planner's layout (KV caches and the
        layers in flight in the VRAM budget; streamed layers and the CPU's parts in the RAM budget) fits."""
        hw = facts.hardware
        reasons = hw.cuda_reasons()
        if reasons:
            return reasons
        assert hw.gpu is not None
        return streaming_reasons(hw.gpu.pcie_gb_s, hw.cpu.memory_bandwidth_gb_s, options.min_speedup) \
            + fits(facts, "cuda_offload_stream", resident_layers=options.resident_layers)

    def planner_options(self) -> dict[str, object]:
        return {"resident_layers": self.options.resident_layers}

    def attach(self, layers: Sequence[nn.Module], placement: Placement) -> Placement:
        """Stream the layers `place` left at home on the CPU; every layer then computes (and keeps its KV cache) on
        the GPU."""
        device = torch.device(STREAMED_DEVICE)
        streamed = [layer for layer, home in zip(layers, placement.layers, strict=True) if not on_gpu(home)]
        self.streamer = LayerStreamer(streamed, device, SideStreamCopier(device), self.options.stream_min_bytes,
                                      pin=True) if streamed else None
        self.placed, self.running = placement, replace(placement, layers=tuple(STREAMED_DEVICE for _ in layers))
        return self.running

    def detach(self, layers: Sequence[nn.Module]) -> None:
        if self.streamer is not None:
            self.streamer.close()
            self.streamer = None

    def shrink(self, placement: Placement) -> Placement | None:
        """After an out-of-memory: stream half of the resident layers, then move the head, embeddings and vision
        tower to the CPU; with only the window and the KV caches left on the GPU, the slot moves down its chain."""
        if self.placed is not None and placement == self.running:
            placement = self.placed                  # the running placement: shrink what place() made
        return smaller_offload_share(placement)
