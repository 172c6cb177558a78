"""The Pascal rule: weights stored fp16, every linear and norm computed in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.slots import Fidelity, Plugin, SelfTestError
from qvl_pipeline.slots.checks import check_kernels
from qvl_pipeline.slots.kernels import KernelsBackend
from qvl_pipeline.slots.selftest import failures_as_selftest_error, self_test_devices


class Fp16StoreLinear(nn.Linear):
    """nn.Linear whose weight is stored fp16 and upcast to fp32 for each product. State dict {weight, bias}."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: [..., in] -> [..., out] fp32
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm and the model's own norm classes (by name: *Norm)."""
    return "norm" in type(module).__name__.lower()


class Fp16StoreFp32ComputeKernels(KernelsBackend):
    fidelity = Fidelity.NEAR
    summary = ("weights stored fp16, linears and norms computed in fp32: the Pascal rule (sm_61 has no bf16 and "
               "runs fp16 math at 1/64 rate; bf16 checkpoints overflow in pure fp16)")

    def linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return Fp16StoreLinear(in_features, out_features, bias=bias, dtype=torch.float16)

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return torch.float32

    def compute_reason(self, stored: torch.dtype) -> str:
        return "fp16_store computes in fp32 (the Pascal rule: fp16 storage, fp32 compute)"

    def prepare(self, model: nn.Module) -> nn.Module:
        """Linear weights to fp16 (biases fp32), norms to fp32; whatever the loader produced elsewhere stays."""
        for module in model.modules():
            if isinstance(module, Fp16StoreLinear):
                module.weight.data = module.weight.data.to(torch.float16)
                if module.bias is not None:
                    module.bias.data = module.bias.data.float()
            elif is_norm(module):
                module.float()
        return model

    def self_test(self, reference: Plugin) -> None:
        with failures_as_selftest_error(f"{type(self).__name__} self-test"):
            mine = self.prepare(self.linear(8, 4, True))
            if mine.weight.dtype != torch.float16:
                raise SelfTestError(f"stores linear weights as {mine.weight.dtype}, not float16")
            if mine(torch.randn(2, 8)).dtype != torch.float32:
                raise SelfTestError("linear does not compute in float32")
        for device in self_test_devices(self.hw):
            check_kernels(self, reference, device)
