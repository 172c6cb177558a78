"""Weights and activations in fp32 whatever the checkpoint's dtype: the fast exact path on CPUs without bf16 math."""

from __future__ import annotations

import torch
from torch import nn

from qvl_pipeline.slots import Fidelity, NoOptions, Plugin, RunFacts
from qvl_pipeline.slots.checks import check_kernels
from qvl_pipeline.slots.kernels import KernelsBackend

GIB = 1024 ** 3
RAM_FRACTION = 0.85      # of RAM the fp32 weights may fill; the rest is activations, KV cache, the OS


class Fp32ComputeKernels(KernelsBackend):
    fidelity = Fidelity.EXACT
    summary = ("fp32 weights and activations whatever the stored dtype; on CPUs without avx512_bf16 bf16 matmul "
               "is slow and fp32 is the fast exact path (4 bytes/param of RAM)")

    @classmethod
    def validate(cls, facts: RunFacts, options: NoOptions) -> list[str]:
        need = facts.model.params.total * 4
        budget = RAM_FRACTION * facts.hardware.ram_gb * GIB
        if need > budget:
            return [f"fp32 weights need {need / GIB:.1f} GiB but {RAM_FRACTION:.0%} of this machine's "
                    f"{facts.hardware.ram_gb:.1f} GiB RAM is {budget / GIB:.1f} GiB; store weights in 16 or 8 bits"]
        return []

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return torch.float32

    def compute_reason(self, stored: torch.dtype) -> str:
        return "fp32_compute upcasts every weight to fp32"

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(torch.float32)        # floating parameters and buffers only; integer buffers stay

    def self_test(self, reference: Plugin) -> None:
        # A bf16 checkpoint: the plugin must compute on the exact fp32 upcast of the stored weights.
        check_kernels(self, reference, stored=torch.bfloat16)
