"""Weights and activations in fp32 whatever the checkpoint's dtype: the fast exact path on CPUs without bf16 math."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.model.sizing import weight_bytes
from qvl_pipeline.slots.base import Fidelity
from qvl_pipeline.slots.kernels import KernelsBackend
from qvl_pipeline.slots.selftest import check_close, failures_as_selftest_error, self_test_devices

RAM_FRACTION = 0.85      # of RAM the fp32 weights may fill; the rest is activations, KV cache, the OS


class Fp32ComputeKernels(KernelsBackend):
    fidelity = Fidelity.EXACT
    summary = ("fp32 weights and activations whatever the stored dtype; on CPUs without avx512_bf16 bf16 matmul "
               "is slow and fp32 is the fast exact path (4 bytes/param of RAM)")

    @classmethod
    def validate(cls, hw: HardwareProfile, cfg: Mapping[str, Any]) -> list[str]:
        hf_config = (cfg.get("model") or {}).get("hf_config")
        if not hf_config:
            return []          # model not known yet: nothing to size
        try:
            need = weight_bytes(hf_config, 4)
        except (KeyError, TypeError):
            return []          # a malformed config is reported by the checkpoint loader, not here
        budget = RAM_FRACTION * hw.ram_gb * 1e9
        if need > budget:
            return [f"fp32 weights need {need / 1e9:.1f} GB but {RAM_FRACTION:.0%} of this machine's "
                    f"{hw.ram_gb:.1f} GB RAM is {budget / 1e9:.1f} GB; store weights in 16 or 8 bits"]
        return []

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return torch.float32

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(torch.float32)        # floating parameters and buffers only; integer buffers stay

    def self_test(self) -> None:
        from qvl_plugins.kernels.torch_native import TorchNativeKernels  # the slot's reference plugin

        gen = torch.Generator().manual_seed(0)
        reference = TorchNativeKernels(self.hw).linear(24, 16, True)
        for device in self_test_devices(self.hw):
            with failures_as_selftest_error(f"{type(self).__name__} self-test on {device}"):
                # A bf16 checkpoint: the plugin must compute on the exact fp32 upcast of the stored weights.
                stored = {n: torch.randn(p.shape, generator=gen).bfloat16() for n, p in reference.state_dict().items()}
                mine = self.linear(24, 16, True).to(torch.bfloat16)
                mine.load_state_dict(stored)
                mine = self.prepare(mine).to(device)
                reference.load_state_dict({n: t.float() for n, t in stored.items()})
                x = torch.randn(3, 24, generator=gen)
                want = reference(x)
                got = mine(x.to(device, self.compute_dtype(torch.bfloat16)))
                check_close(f"linear on {device}", got, want, self.fidelity)
