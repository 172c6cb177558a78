"""What every plugin is: a named, validatable, self-testing component of one slot."""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum
from typing import Any, ClassVar

from qvl_pipeline.hardware.profile import HardwareProfile


class Fidelity(IntEnum):
    """How far a plugin's results may sit from the reference plugin of its slot."""

    REFERENCE = 0     # the reference itself: bit-comparable with the oracle
    EXACT = 1         # same maths, different order of floating-point operations
    NEAR = 2          # weight-only int8 and similar: small, measured error
    APPROXIMATE = 3   # int4, int8 KV cache, sparse attention: trades accuracy for speed/memory


class SelfTestError(RuntimeError):
    """A plugin's self-test disagreed with the reference of its slot."""


class Plugin:
    """Base of every plugin.

    Subclasses set `slot`, `fidelity` and a one-line `summary`; the registry assigns `name`. A plugin is
    constructed with the machine's facts and its own options (the `options` mapping of its slot config).
    """

    slot: ClassVar[str] = ""
    name: ClassVar[str] = ""
    fidelity: ClassVar[Fidelity] = Fidelity.REFERENCE
    summary: ClassVar[str] = ""

    def __init__(self, hw: HardwareProfile, options: Mapping[str, Any] | None = None) -> None:
        self.hw = hw
        self.options = dict(options or {})

    @classmethod
    def validate(cls, hw: HardwareProfile, cfg: Mapping[str, Any]) -> list[str]:
        """Reasons this plugin cannot run on `hw` with run config `cfg`; empty means usable."""
        return []

    def self_test(self) -> None:
        """Cheap check against the reference plugin of the slot; raises SelfTestError on disagreement."""

    def describe(self) -> str:
        return f"{self.name}: {self.summary}"
