"""The kernels slot: how weights are stored and how linear layers compute (dtype, format, SIMD path)."""

from __future__ import annotations

import torch
from torch import nn

from qvl_pipeline.model.norms import RMSNorm
from qvl_pipeline.slots.base import Plugin
from qvl_pipeline.weight_format import WeightFormat, builtin_format


class KernelsBackend(Plugin):
    """Chooses the dtypes and the linear-layer implementation.

    `linear(in, out, bias)` makes a module whose state dict is exactly {"weight": [out, in], "bias": [out]?},
    so checkpoint names stay one-to-one with Hugging Face; `norm(size, eps)` makes the decoder's RMSNorm (state
    dict {"weight": [size]}; the reference is model/norms.py). `compute_dtype(stored)` says in which dtype
    activations flow for a checkpoint stored as `stored`. `prepare(model)` runs once after the weights are
    loaded (repacking, quantising); it must keep outputs within the plugin's fidelity.
    """

    slot = "kernels"
    reference = "torch_native"

    def linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def norm(self, size: int, eps: float) -> nn.Module:
        return RMSNorm(size, eps)

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return stored

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def weight_format(self, stored_dtype: str) -> WeightFormat:
        """How this plugin leaves the weights of a checkpoint stored as `stored_dtype` (bytes per part), so the
        memory slot plans with what will really be loaded. The built-in plugins are described by name in
        `builtin_format`; a third-party plugin that changes the weights' size overrides this."""
        return builtin_format(self.name, self.options, stored_dtype)

    def self_test(self, reference: Plugin) -> None:
        from qvl_pipeline.slots.checks import check_kernels

        check_kernels(self, reference)
