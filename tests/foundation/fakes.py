"""Fault-injecting test plugins: each fails in one controlled way."""

from __future__ import annotations

import torch

from qvl_pipeline.slots import AttentionBackend, Fidelity, SelfTestError
from qvl_plugins.attention.eager import EagerAttention


class NeedsGpu(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: valid only with a GPU"

    @classmethod
    def validate(cls, facts, options):
        return [] if facts.hardware.gpu is not None else ["fake needs a GPU"]


class FailsSelfTest(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: self-test always disagrees"

    def self_test(self, reference):
        raise SelfTestError("max abs diff 0.5 > 1e-5")


class Approximate(EagerAttention):
    fidelity = Fidelity.APPROXIMATE
    summary = "fake: approximate"


class BrokenValidate(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: validate raises"

    @classmethod
    def validate(cls, facts, options):
        raise KeyError("cfg.missing")


class CrashesAtRun(EagerAttention):
    """Passes its self-test (small inputs), then fails on the real workload, as an OOM or a missing kernel would."""

    fidelity = Fidelity.EXACT
    summary = "fake: raises a CUDA-like error when attending"
    _testing = False

    def self_test(self, reference):
        self._testing = True
        try:
            super().self_test(reference)
        finally:
            self._testing = False

    def attend(self, q, k, v, *, causal, scale):
        if not self._testing:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return super().attend(q, k, v, causal=causal, scale=scale)


class Good(EagerAttention):
    fidelity = Fidelity.EXACT
    summary = "fake: always fine"


class NoFidelity(AttentionBackend):
    """A plugin that forgot to declare its fidelity (it would silently count as the reference otherwise)."""

    summary = "fake: no fidelity"

    def attend(self, q, k, v, *, causal, scale):
        return EagerAttention.attend(self, q, k, v, causal=causal, scale=scale)


class WrongLayout(EagerAttention):
    """Returns [b, h, q, d] instead of [b, q, h, d]: the default self-test must catch it."""

    fidelity = Fidelity.EXACT
    summary = "fake: transposed output"

    def attend(self, q, k, v, *, causal, scale):
        return super().attend(q, k, v, causal=causal, scale=scale).transpose(1, 2).contiguous()


class WrongValues(EagerAttention):
    """Right shape, wrong numbers (scale ignored): would change the tokens if admitted."""

    fidelity = Fidelity.EXACT
    summary = "fake: ignores the scale"

    def attend(self, q, k, v, *, causal, scale):
        return super().attend(q, k, v, causal=causal, scale=1.0)


class NotAPlugin:
    pass


FAKES = {"needs_gpu": NeedsGpu, "fails_self_test": FailsSelfTest, "approximate": Approximate,
         "broken_validate": BrokenValidate, "crashes_at_run": CrashesAtRun, "good": Good,
         "no_fidelity": NoFidelity, "wrong_layout": WrongLayout, "wrong_values": WrongValues,
         "eager": EagerAttention}


def attention_inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 3, 8, generator=g)
    k = torch.randn(1, 2, 3, 8, generator=g)
    return q, k, k.clone()


__all__ = ["FAKES", "AttentionBackend", "NotAPlugin", "attention_inputs"]
