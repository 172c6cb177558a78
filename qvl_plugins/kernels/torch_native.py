"""Reference kernels: torch.nn.Linear in the checkpoint's own dtype."""

from __future__ import annotations

from qvl_pipeline.slots import Fidelity
from qvl_pipeline.slots.kernels import KernelsBackend


class TorchNativeKernels(KernelsBackend):
    fidelity = Fidelity.REFERENCE
    summary = "torch.nn.Linear in the stored dtype (ATen's own SIMD dispatch), the reference"
