"""The kernels slot: how weights are stored and how linear layers compute (dtype, format, SIMD path)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from qvl_pipeline.hardware.chains import native_bf16
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.model.activations import activation
from qvl_pipeline.model.norms import RMSNorm
from qvl_pipeline.slots.base import Plugin
from qvl_pipeline.slots.kv_cache import KVCache
from qvl_pipeline.weight_format import WeightFormat, builtin_format

FLOAT_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}
# The values of a `compute_dtype` plugin option: auto (the rule in `choose_compute_dtype`), stored (the checkpoint's
# dtype), or a dtype by name.
COMPUTE_DTYPE_CHOICES: tuple[str, ...] = ("auto", "stored", *FLOAT_DTYPES)
# GPUs compute 16-bit floats natively from these compute capabilities (bf16: Ampere; fp16 tensor cores: Volta).
GPU_NATIVE_FROM: dict[torch.dtype, tuple[int, int]] = {torch.bfloat16: (8, 0), torch.float16: (7, 0)}


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16"."""
    return str(dtype).removeprefix("torch.")


class DecodeStep(Protocol):
    """A decoder stack's whole decode step in one call (KernelsBackend.decode_step)."""

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: KVCache) -> torch.Tensor | None:
        """x [1, 1, hidden], cos/sin [1, 1, 1, head_dim] -> the stack's output [1, 1, hidden], the new position
        appended to every layer's cache (not advanced); None when it does not take this step (the per-op path runs,
        nothing was written)."""
        ...


@dataclass(frozen=True)
class ComputeDtype:
    """The dtype activations (hidden states, the KV cache, the vision tower's activations) flow in, and why."""

    dtype: torch.dtype
    reason: str

    def describe(self) -> str:
        """"float32: this CPU has no native bf16 ..." (the plan's line)."""
        return f"{dtype_name(self.dtype)}: {self.reason}"


def native_half(hw: HardwareProfile, dtype: torch.dtype) -> tuple[str, str | None, str]:
    """(the device that computes the decoder, the feature with which it computes the 16-bit `dtype` natively or None,
    what it lacks otherwise): the GPU where torch can use one (every GPU memory plan puts the decoder's first layers
    there), else the CPU (bf16: AVX512-BF16 or AMX-BF16; no fp16 arithmetic flag is probed: fp16 counts as emulated)."""
    if hw.cuda_usable:
        assert hw.gpu is not None
        major, minor = GPU_NATIVE_FROM[dtype]
        native = hw.gpu.compute_capability >= (major, minor)
        return "this GPU", f"sm_{hw.gpu.sm}" if native else None, f"sm_{hw.gpu.sm}; needs sm_{major}{minor}+"
    if dtype == torch.bfloat16:
        feature = "AMX-BF16" if hw.has_isa("amx_bf16") else "AVX512-BF16" if native_bf16(hw) else None
        return "this CPU", feature, "no AVX512-BF16/AMX"
    return "this CPU", None, "AVX512-FP16/AMX-FP16 are not probed"


def choose_compute_dtype(option: str, stored: torch.dtype, hw: HardwareProfile, *,
                         integer_matmuls: bool = False) -> ComputeDtype:
    """The compute dtype for a checkpoint stored as `stored` on `hw` under a `compute_dtype` option (pure).

    auto: the stored dtype where it is fp32 or where the computing device does its 16-bit arithmetic natively; fp32
    elsewhere (an AVX2 CPU or a Pascal GPU emulates bf16/fp16 matmuls, several times slower than fp32) — unless the
    plugin multiplies every input on this CPU through an integer kernel (`integer_matmuls`): then no matmul runs in
    the activations' dtype and the stored 16-bit dtype halves the bytes of the activations and the KV cache.
    stored: the checkpoint's dtype. A dtype name: that dtype.
    """
    if option == "stored":
        return ComputeDtype(stored, "the checkpoint's dtype (compute_dtype=stored)")
    if option != "auto":
        return ComputeDtype(FLOAT_DTYPES[option], f"compute_dtype={option}")
    if stored == torch.float32:
        return ComputeDtype(stored, "the checkpoint's dtype")
    device, feature, need = native_half(hw, stored)
    name = dtype_name(stored)
    if feature is not None:
        return ComputeDtype(stored, f"the checkpoint's dtype, native on {device} ({feature})")
    if integer_matmuls and not hw.cuda_usable:
        return ComputeDtype(stored, f"the checkpoint's dtype: {device} has no native {name} ({need}) but every "
                                    "matmul runs through the integer kernel, so fp32 would only double the bytes of "
                                    "the activations and the KV cache")
    return ComputeDtype(torch.float32, f"{device} has no native {name} ({need}): {name} matmuls would be "
                                       "emulated, fp32 is faster")


def check_compute_option(option: str) -> None:
    """ValueError unless `option` is one of COMPUTE_DTYPE_CHOICES (for the plugins' Options.__post_init__)."""
    if option not in COMPUTE_DTYPE_CHOICES:
        raise ValueError(f"compute_dtype {option!r} is not one of {list(COMPUTE_DTYPE_CHOICES)}")


class KernelsBackend(Plugin):
    """Chooses the dtypes and the linear-layer implementation.

    `linear(in, out, bias)` makes a module whose state dict is exactly {"weight": [out, in], "bias": [out]?}, so
    checkpoint names stay one-to-one with Hugging Face; `norm(size, eps)` makes the decoder's RMSNorm (state dict
    {"weight": [size]}; the reference is model/norms.py); `activation(name)` is the MLPs' activation function;
    `project(x, layers)` applies several of its linears to one input. `compute_dtype(stored)` says in which dtype
    activations flow for a checkpoint stored as `stored` (the run's hidden states, KV cache and vision tower
    activations; the model casts its norms and patch embedding to it, never its embedding table); where it differs
    from the stored dtype, the plugin's prepared linears and norms take activations of the compute dtype.
    `prepare(model)` runs once after the weights are loaded (repacking, quantising); it must keep outputs within the
    plugin's fidelity.
    """

    slot = "kernels"
    reference = "torch_native"

    def linear(self, in_features: int, out_features: int, bias: bool) -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def norm(self, size: int, eps: float) -> nn.Module:
        return RMSNorm(size, eps)

    def activation(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The MLPs' activation a config's `hidden_act` names (reference: model/activations.py). Its argument is
        always a temporary (a projection's output nothing else reads), so it may compute in place and return its
        input."""
        return activation(name)

    def project(self, x: torch.Tensor, layers: Sequence[nn.Module]) -> tuple[torch.Tensor, ...]:
        """x through several linear layers made by `linear` that take the same input (q/k/v, gate/up); a plugin
        may compute them together."""
        return tuple(layer(x) for layer in layers)

    def decode_step(self, layers: Sequence[nn.Module], dtype: torch.dtype) -> tuple[DecodeStep | None, str]:
        """A fused decode step over these prepared, placed decoder layers computing in `dtype` (a DecodeStep,
        which model/text.py calls for batch-1 decode steps), or None and why the per-op path runs: asked once after
        each placement."""
        return None, f"kernels={self.name} has no fused decode step"

    def compute_dtype(self, stored: torch.dtype) -> torch.dtype:
        return stored

    def compute_reason(self, stored: torch.dtype) -> str:
        """Why activations flow in `compute_dtype(stored)` (the plan's line); plugins with a rule say it."""
        return "the checkpoint's dtype" if self.compute_dtype(stored) == stored else f"chosen by {self.name}"

    def compute(self, stored: torch.dtype) -> ComputeDtype:
        """compute_dtype and compute_reason together."""
        return ComputeDtype(self.compute_dtype(stored), self.compute_reason(stored))

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
