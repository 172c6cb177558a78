"""Fault-injecting test plugins for the attention slot: each fails in one controlled way."""

from __future__ import annotations

import torch

from qvl_pipeline.slots import AttentionBackend, Fidelity, SelfTestError
from qvl_plugins.attention.eager import EagerAttention


class NeedsGpu(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: valid only with a GPU"

    @classmethod
    def validate(cls, hw, cfg):
        return [] if hw.gpu is not None else ["fake needs a GPU"]


class FailsSelfTest(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: self-test always disagrees"

    def self_test(self):
        raise SelfTestError("max abs diff 0.5 > 1e-5")


class Approximate(EagerAttention):
    fidelity = Fidelity.APPROXIMATE
    summary = "fake: approximate"


class BrokenValidate(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: validate raises"

    @classmethod
    def validate(cls, hw, cfg):
        raise KeyError("cfg.missing")


class CrashesAtRun(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: raises a CUDA-like error when attending"

    def attend(self, q, k, v, *, causal, scale):
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")


class Good(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: always fine"


class NotAPlugin:
    pass


FAKES = {"needs_gpu": NeedsGpu, "fails_self_test": FailsSelfTest, "approximate": Approximate,
         "broken_validate": BrokenValidate, "crashes_at_run": CrashesAtRun, "good": Good,
         "eager": EagerAttention}


def attention_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g)
    k = torch.randn(1, 2, 3, 8, generator=g)
    return q, k, k.clone()


__all__ = ["FAKES", "AttentionBackend", "NotAPlugin", "attention_inputs"]
