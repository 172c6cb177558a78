"""Plugin ids → dotted paths, imported only when selected; built-ins and entry-point plugins alike."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from qvl_pipeline.errors import PluginError

if TYPE_CHECKING:      # the registry lists names without importing torch; classes are imported when selected
    from qvl_pipeline.slots import Plugin

ENTRY_POINT_GROUP = "qvl_pipeline.plugins"
# The plugin slots, in resolution order (the interfaces are `qvl_pipeline.slots.SLOTS`, keyed alike).
SLOT_NAMES = ("attention", "rotary", "kernels", "memory", "kv_cache")
BUILTIN_ORIGIN = "qvl_plugins (built-in)"

# Built-in plugins: slot -> name -> "module:Class". Nothing here is imported until selected.
BUILTIN: dict[str, dict[str, str]] = {
    "attention": {
        "eager": "qvl_plugins.attention.eager:EagerAttention",
        "sdpa": "qvl_plugins.attention.sdpa:SdpaAttention",
        "native": "qvl_plugins.attention.native:NativeAttention",
        "chunked": "qvl_plugins.attention.chunked:ChunkedAttention",
        "sdpa_mem_efficient": "qvl_plugins.attention.sdpa_mem_efficient:SdpaMemEfficientAttention",
        "sdpa_flash": "qvl_plugins.attention.sdpa_flash:SdpaFlashAttention",
    },
    "rotary": {
        "reference": "qvl_plugins.rotary.reference:ReferenceRotary",
        "cached": "qvl_plugins.rotary.cached:CachedRotary",
        "native": "qvl_plugins.rotary.native:NativeRotary",
    },
    "kernels": {
        "torch_native": "qvl_plugins.kernels.torch_native:TorchNativeKernels",
        "fp32_compute": "qvl_plugins.kernels.fp32_compute:Fp32ComputeKernels",
        "fp16_store": "qvl_plugins.kernels.fp16_store:Fp16StoreFp32ComputeKernels",
        "int8_dynamic": "qvl_plugins.kernels.int8_dynamic:Int8DynamicKernels",
        "int8_weight_only": "qvl_plugins.kernels.int8_weight_only:Int8WeightOnlyKernels",
        "int4_weight_only": "qvl_plugins.kernels.int4_weight_only:Int4WeightOnlyKernels",
    },
    "memory": {
        "cpu": "qvl_plugins.memory.cpu:CpuMemory",
        "cuda_full": "qvl_plugins.memory.cuda_full:CudaFullMemory",
        "cuda_partial": "qvl_plugins.memory.cuda_partial:CudaPartialMemory",
        "cuda_offload_stream": "qvl_plugins.memory.cuda_offload_stream:CudaOffloadStreamMemory",
        "ssd_stream": "qvl_plugins.memory.ssd_stream:SsdStreamMemory",
    },
    "kv_cache": {
        "static": "qvl_plugins.kv_cache.static:StaticCache",
        "dynamic": "qvl_plugins.kv_cache.dynamic:DynamicCache",
        "int8": "qvl_plugins.kv_cache.int8:Int8KVCache",
    },
}

Target = "str | type[Plugin]"


@dataclass(frozen=True)
class Discovered:
    """An entry point found in the group: "<slot>.<name>" = "module:Class", and the distribution shipping it."""

    slot: str
    name: str
    target: str
    distribution: str


@dataclass(frozen=True)
class PluginSpec:
    """A loaded plugin class under its registered name, and where it came from."""

    slot: str
    name: str
    cls: type[Plugin]
    origin: str


def entry_point_plugins() -> list[Discovered]:
    """Third-party plugins: entry points named "<slot>.<name>" in the group qvl_pipeline.plugins."""
    found = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        slot, _, name = ep.name.partition(".")
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unknown distribution"
        found.append(Discovered(slot, name, ep.value, dist))
    return found


def plugin_class_problems(cls: object, slot: str) -> list[str]:
    """Why `cls` cannot be a plugin of `slot` (pure): not a subclass of the interface, no declared fidelity,
    Options not a dataclass."""
    from qvl_pipeline.slots import SLOTS, Fidelity

    interface = SLOTS[slot]
    if not (isinstance(cls, type) and issubclass(cls, interface)):
        return [f"{cls!r} is not a subclass of {interface.__name__} (qvl_pipeline.slots)"]
    problems = []
    if not isinstance(getattr(cls, "fidelity", None), Fidelity):
        problems.append(f"{cls.__name__} declares no fidelity (set `fidelity = Fidelity.EXACT` or another level)")
    if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        problems.append(f"{cls.__name__}.Options is not a dataclass")
    return problems


class PluginRegistry:
    """Knows every plugin name per slot and imports a plugin class on first use."""

    def __init__(self, builtin: Mapping[str, Mapping[str, Target]] | None = None,
                 discover: Callable[[], Iterable[Discovered]] | None = entry_point_plugins) -> None:
        self._targets: dict[str, dict[str, Target]] = {slot: {} for slot in SLOT_NAMES}
        self._origin: dict[tuple[str, str], str] = {}
        self._loaded: dict[tuple[str, str], PluginSpec] = {}
        self.problems: list[str] = []
        for slot, names in (BUILTIN if builtin is None else builtin).items():
            for name, target in names.items():
                self.register(slot, name, target, origin=BUILTIN_ORIGIN)
        for found in (discover() if discover else ()):
            where = f"entry point {found.slot}.{found.name} = {found.target} (from {found.distribution})"
            if found.slot not in SLOT_NAMES:
                self.problems.append(f"{where} names no slot; slots are {', '.join(SLOT_NAMES)}")
            elif found.name in ("", "auto") or not found.name.isidentifier():
                self.problems.append(f"{where} ignored: a plugin name must be an identifier other than 'auto'")
            elif found.name in self._targets[found.slot]:
                self.problems.append(f"{where} ignored: the name is taken by "
                                     f"{self._origin[(found.slot, found.name)]}")
            else:
                self.register(found.slot, found.name, found.target, origin=found.distribution)

    def register(self, slot: str, name: str, target: Target, origin: str = "registered in code") -> None:
        """Add (or replace) a plugin: a "module:Class" path or the class itself."""
        if slot not in SLOT_NAMES:
            raise PluginError(f"unknown slot {slot!r}", f"slots are: {', '.join(SLOT_NAMES)}")
        self._targets[slot][name] = target
        self._origin[(slot, name)] = origin
        self._loaded.pop((slot, name), None)

    def names(self, slot: str) -> list[str]:
        return sorted(self._targets.get(slot, {}))

    def has(self, slot: str, name: str) -> bool:
        return name in self._targets.get(slot, {})

    def origin(self, slot: str, name: str) -> str:
        return self._origin.get((slot, name), "")

    def load(self, slot: str, name: str) -> PluginSpec:
        """Import the plugin class; PluginError names the available plugins, the import problem, or what the
        class lacks."""
        key = (slot, name)
        if key in self._loaded:
            return self._loaded[key]
        if not self.has(slot, name):
            raise PluginError(f"unknown {slot} plugin {name!r}",
                              f"choose one of: {', '.join(self.names(slot))} (e.g. {slot}={self.names(slot)[0]})")
        target = self._targets[slot][name]
        cls = _import_target(target, slot, name) if isinstance(target, str) else target
        problems = plugin_class_problems(cls, slot)
        if problems:
            raise PluginError(f"{slot} plugin {name!r} ({target}) is not usable: {'; '.join(problems)}",
                              "fix the plugin class (see plugins/README.md) or pick another plugin")
        spec = PluginSpec(slot, name, cls, self._origin[key])
        self._loaded[key] = spec
        return spec


def _import_target(target: str, slot: str, name: str) -> type:
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except Exception as exc:    # a third-party module may raise anything on import: report it, never crash
        raise PluginError(f"{slot} plugin {name!r} could not be imported from {target}: "
                          f"{type(exc).__name__}: {exc}",
                          "reinstall the package that provides it, or pick another plugin") from exc
