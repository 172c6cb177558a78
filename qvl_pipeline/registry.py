"""Plugin ids → dotted paths, imported only when selected; built-ins and entry-point plugins alike."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from importlib.metadata import entry_points

from qvl_pipeline.errors import PluginError
from qvl_pipeline.slots import SLOTS, Plugin

ENTRY_POINT_GROUP = "qvl_pipeline.plugins"

# Built-in plugins: slot -> name -> "module:Class". Nothing here is imported until selected.
BUILTIN: dict[str, dict[str, str]] = {
    "attention": {
        "eager": "qvl_plugins.attention.eager:EagerAttention",
        "sdpa": "qvl_plugins.attention.sdpa:SdpaAttention",
        "chunked": "qvl_plugins.attention.chunked:ChunkedAttention",
        "sdpa_mem_efficient": "qvl_plugins.attention.sdpa_mem_efficient:SdpaMemEfficientAttention",
        "sdpa_flash": "qvl_plugins.attention.sdpa_flash:SdpaFlashAttention",
    },
    "rotary": {
        "reference": "qvl_plugins.rotary.reference:ReferenceRotary",
        "cached": "qvl_plugins.rotary.cached:CachedRotary",
    },
    "kernels": {
        "torch_native": "qvl_plugins.kernels.torch_native:TorchNativeKernels",
        "fp32_compute": "qvl_plugins.kernels.fp32_compute:Fp32ComputeKernels",
        "fp16_store": "qvl_plugins.kernels.fp16_store:Fp16StoreFp32ComputeKernels",
        "int8_weight_only": "qvl_plugins.kernels.int8_weight_only:Int8WeightOnlyKernels",
    },
    "memory": {
        "cpu": "qvl_plugins.memory.cpu:CpuMemory",
        "cuda_full": "qvl_plugins.memory.cuda_full:CudaFullMemory",
        "cuda_partial": "qvl_plugins.memory.cuda_partial:CudaPartialMemory",
    },
    "kv_cache": {
        "static": "qvl_plugins.kv_cache.static:StaticCache",
        "dynamic": "qvl_plugins.kv_cache.dynamic:DynamicCache",
        "int8": "qvl_plugins.kv_cache.int8:Int8KVCache",
    },
}

Target = str | type[Plugin]


def _entry_point_targets() -> dict[str, dict[str, str]]:
    """Third-party plugins: entry points named "<slot>.<name>" in the group qvl_pipeline.plugins."""
    found: dict[str, dict[str, str]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        slot, _, name = ep.name.partition(".")
        found.setdefault(slot, {})[name] = ep.value
    return found


class PluginRegistry:
    """Knows every plugin name per slot and imports a plugin class on first use."""

    def __init__(self, builtin: Mapping[str, Mapping[str, Target]] | None = None,
                 discover: Callable[[], Mapping[str, Mapping[str, str]]] | None = _entry_point_targets) -> None:
        self._targets: dict[str, dict[str, Target]] = {slot: {} for slot in SLOTS}
        self.origin: dict[tuple[str, str], str] = {}
        self.problems: list[str] = []
        for slot, names in (BUILTIN if builtin is None else builtin).items():
            for name, target in names.items():
                self.register(slot, name, target, origin="built-in")
        for slot, names in (discover() if discover else {}).items():
            for name, target in names.items():
                if slot not in SLOTS:
                    self.problems.append(f"entry point {slot}.{name} ({target}) names no slot; "
                                         f"slots are {sorted(SLOTS)}")
                    continue
                if name in self._targets[slot]:
                    self.problems.append(f"entry point {slot}.{name} ({target}) ignored: the name is taken "
                                         f"by the {self.origin[(slot, name)]} plugin")
                    continue
                self.register(slot, name, target, origin=f"entry point {target}")
        self._loaded: dict[tuple[str, str], type[Plugin]] = {}

    def register(self, slot: str, name: str, target: Target, origin: str = "registered") -> None:
        """Add (or replace) a plugin: a "module:Class" path or the class itself."""
        if slot not in SLOTS:
            raise PluginError(f"unknown slot {slot!r}", f"slots are: {', '.join(sorted(SLOTS))}")
        self._targets[slot][name] = target
        self.origin[(slot, name)] = origin
        getattr(self, "_loaded", {}).pop((slot, name), None)

    def names(self, slot: str) -> list[str]:
        return sorted(self._targets.get(slot, {}))

    def has(self, slot: str, name: str) -> bool:
        return name in self._targets.get(slot, {})

    def load(self, slot: str, name: str) -> type[Plugin]:
        """Import and return the plugin class; errors name the available plugins or the import problem."""
        key = (slot, name)
        if key in self._loaded:
            return self._loaded[key]
        if not self.has(slot, name):
            raise PluginError(f"unknown {slot} plugin {name!r}",
                              f"choose one of: {', '.join(self.names(slot))} (e.g. {slot}={self.names(slot)[0]})")
        target = self._targets[slot][name]
        cls = _import_target(target, slot, name) if isinstance(target, str) else target
        interface = SLOTS[slot]
        if not (isinstance(cls, type) and issubclass(cls, interface)):
            raise PluginError(f"{slot} plugin {name!r} ({target}) is not a subclass of {interface.__name__}",
                              "a plugin must subclass its slot's interface from qvl_pipeline.slots")
        # Each registered name gets its own subclass so `name` never leaks between aliases of one class.
        named = type(cls.__name__, (cls,), {"name": name, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__})
        self._loaded[key] = named
        return named


def _import_target(target: str, slot: str, name: str) -> type:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"{slot} plugin {name!r} could not be imported from {target}: {exc}",
                          "reinstall the package that provides it, or pick another plugin") from exc
