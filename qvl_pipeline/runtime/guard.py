"""Slot guards: stand-ins for a slot's plugin that tag its failures and can be re-pointed at run time.

The model holds the guard, never the plugin, so moving a slot to the next entry of its chain after a runtime
failure (CUDA out-of-memory, "no kernel image", a kernel error) changes every layer at once.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from qvl_pipeline.errors import PluginRuntimeError, QvlError
from qvl_pipeline.slots import SLOTS, Plugin


def _forward(method_name: str):
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        target = self._target
        try:
            return getattr(target, method_name)(*args, **kwargs)
        except (QvlError, PluginRuntimeError):
            raise
        except RuntimeError as exc:      # torch errors (OOM, missing kernels, CUDA faults) are RuntimeErrors
            raise PluginRuntimeError(self._slot, target.name, exc) from exc
    return call


@functools.cache
def _guard_class(slot: str) -> type:
    interface = SLOTS[slot]
    methods = {name: _forward(name) for name, value in inspect.getmembers(interface, inspect.isfunction)
               if not name.startswith("_") and name not in vars(Plugin) and name != "validate"}

    def __init__(self: Any, target: Plugin) -> None:
        self._slot, self._target = slot, target

    def __getattr__(self: Any, name: str) -> Any:
        return getattr(self._target, name)

    def retarget(self: Any, target: Plugin) -> None:
        self._target = target

    props = {attr: property(lambda self, a=attr: getattr(self._target, a))
             for attr in ("name", "fidelity", "summary", "options", "hw")}
    body = {"__init__": __init__, "__getattr__": __getattr__, "retarget": retarget, **methods, **props,
            "__doc__": f"Guard of the {slot} slot."}
    return type(f"{interface.__name__}Guard", (interface,), body)


def guard(slot: str, plugin: Plugin) -> Plugin:
    """A guard for `plugin` that is an instance of the slot's interface."""
    return _guard_class(slot)(plugin)
