"""What every plugin is: a named, validatable, self-testing component of one slot, with typed options."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from qvl_pipeline.facts import RunFacts
    from qvl_pipeline.hardware.profile import HardwareProfile


class Fidelity(IntEnum):
    """How far a plugin's results may sit from the reference plugin of its slot."""

    REFERENCE = 0     # the reference itself: bit-comparable with the oracle
    EXACT = 1         # same maths, different order of floating-point operations
    NEAR = 2          # weight-only int8 and similar: small, measured error
    APPROXIMATE = 3   # int4, int8 KV cache, sparse attention: trades accuracy for speed/memory


class SelfTestError(RuntimeError):
    """A plugin's self-test disagreed with the reference of its slot."""


@dataclass(frozen=True)
class NoOptions:
    """The options of a plugin that takes none."""


class Plugin:
    """Base of every plugin.

    A plugin class declares `fidelity` (required: a class without it is rejected), a one-line `summary`, and
    `Options`, a dataclass of its own options with their defaults (set by the user as
    `<slot>.options.<plugin name>.<option>=value`). It is constructed with the run's facts and its options;
    `validate` says why it cannot run for given facts; `self_test` checks it against the slot's reference
    plugin (each slot interface provides a default through the public checkers in `qvl_pipeline.slots.checks`).
    """

    slot: ClassVar[str] = ""
    reference: ClassVar[str] = ""          # name of the slot's reference plugin (set by the slot interface)
    fidelity: ClassVar[Fidelity]           # required on every concrete plugin class
    summary: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, facts: RunFacts, options: Any = None, *, name: str = "") -> None:
        self.facts = facts
        self.options = type(self).Options() if options is None else options
        self.name = name or type(self).__name__

    @property
    def hw(self) -> HardwareProfile:
        """The machine facts (a shortcut for `facts.hardware`)."""
        return self.facts.hardware

    @classmethod
    def validate(cls, facts: RunFacts, options: Any) -> list[str]:
        """Reasons this plugin cannot run with these facts and options; empty means usable."""
        return []

    def self_test(self, reference: Plugin) -> None:
        """Cheap check against `reference` (the slot's reference plugin); raises SelfTestError on disagreement."""

    def describe(self) -> str:
        return f"{self.name}: {self.summary}"
