"""Shared by the kernels plugins' self-tests: a random reference linear and the plugin's prepared copy."""

from __future__ import annotations

import torch
from torch import nn

from qvl_pipeline.slots.kernels import KernelsBackend


def prepared_pair(kernels: KernelsBackend, in_features: int, out_features: int, gen: torch.Generator,
                  device: torch.device | str) -> tuple[nn.Module, nn.Module]:
    """(reference nn.Linear with random weights on the CPU, the same weights through `kernels` on `device`)."""
    from qvl_plugins.kernels.torch_native import TorchNativeKernels  # the slot's reference plugin

    reference = TorchNativeKernels(kernels.hw).linear(in_features, out_features, True)
    with torch.no_grad():
        for p in reference.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    mine = kernels.linear(in_features, out_features, True)
    mine.load_state_dict(reference.state_dict())
    return reference, kernels.prepare(mine).to(device)
