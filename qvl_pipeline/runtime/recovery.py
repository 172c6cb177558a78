"""Runtime fallback: a slot's plugin failed mid-request, so move that slot along its chain and re-point its guard;
the engine restores its state and retries the step."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping

from qvl_pipeline.errors import PluginRuntimeError
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.slots import Plugin

GUARDED_SLOTS = ("attention", "rotary")   # pure-compute slots that can move along their chain mid-request


def tell_stderr(line: str) -> None:
    print(f"qvl-pipeline: {line}", file=sys.stderr)


class Recovery:
    """Called by the engine with a runtime failure; raises it again when its slot cannot move on."""

    def __init__(self, resolver: Resolver, guards: Mapping[str, Plugin],
                 notify: Callable[[str], None] = tell_stderr) -> None:
        self.resolver = resolver
        self.guards = guards
        self.notify = notify

    def __call__(self, failure: PluginRuntimeError) -> None:
        if failure.slot not in self.guards:
            raise failure
        replacement = self.resolver.fallback(failure.slot, failure.error)
        self.guards[failure.slot].retarget(replacement)
        self.notify(f"{failure}; continuing with {failure.slot}={replacement.name}")
