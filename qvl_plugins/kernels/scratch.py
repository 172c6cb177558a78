"""A reused scratch buffer for weights widened on the fly (the quantised linears' prefill path).

A fresh full-size tensor per call is a new memory mapping once it exceeds glibc's mmap threshold (at most 32 MiB),
and every 4 KiB page of it faults on first write (measured ~2 µs a fault on the 2-core VM: ~20 ms for 39 MiB);
below that it still churns the heap. One buffer per thread, device, dtype and use, grown to the largest layer
and kept (2B: ~37 MiB), is written and read back without either; per thread, so concurrent requests in threads
never share one.
"""

from __future__ import annotations

import threading

import torch

# Elements a layer widens at once (64 MiB in bf16): larger weights (a quantised output head) go a block of output
# rows at a time, so the buffer stays bounded.
MAX_ELEMENTS = 1 << 25


class _Buffers(threading.local):
    def __init__(self) -> None:
        self.flat: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


_BUFFERS = _Buffers()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str = "weight") -> torch.Tensor:
    """A contiguous tensor of `shape` viewing this thread's buffer for (slot, device, dtype); its contents are
    undefined and valid until the next call for the same slot, device and dtype. Not for a weight that autograd
    keeps for a backward pass (see `recorded`)."""
    numel = 1
    for n in shape:
        numel *= n
    key = (slot, torch.device(device), dtype)
    flat = _BUFFERS.flat.get(key)
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):        # a normal tensor: writable inside inference mode and outside it
            flat = _BUFFERS.flat[key] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def rows_per_block(out_features: int, in_features: int, multiple: int = 1) -> int:
    """Output rows to widen at once: the whole weight when it fits MAX_ELEMENTS, else a multiple of `multiple`."""
    if out_features * in_features <= MAX_ELEMENTS:
        return out_features
    return max(multiple, MAX_ELEMENTS // in_features // multiple * multiple)


def recorded(x: torch.Tensor) -> bool:
    """Whether autograd records an op on `x` (then a widened weight must not be a scratch view that the next layer
    overwrites before the backward pass reads it)."""
    return torch.is_grad_enabled() and x.requires_grad
