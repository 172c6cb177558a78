"""The dependency-injection wiring: config enters once, stages get their slot plugins from the resolver."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dependency_injector import containers, providers

from qvl_pipeline.hardware.build import HardwareReport, build_hardware
from qvl_pipeline.hardware.probe import probe_machine
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.registry import PluginRegistry
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.slots import (
    AttentionBackend,
    KernelsBackend,
    KVCacheBackend,
    MemoryManager,
    Plugin,
    RotaryBackend,
)


def _profile_of(report: HardwareReport) -> HardwareProfile:
    return report.profile


def _resolve(resolver: Resolver, slot: str) -> Plugin:
    return resolver.resolve(slot)


class CoreContainer(containers.DeclarativeContainer):
    """Machine facts, the plugin registry, resolution, and one resolved plugin per slot (singletons)."""

    config = providers.Configuration()
    prober = providers.Object(probe_machine)
    hardware_report = providers.Singleton(build_hardware, config.hardware, prober, config.model.path)
    hardware = providers.Singleton(_profile_of, hardware_report)
    registry = providers.Singleton(PluginRegistry)
    resolver = providers.Singleton(Resolver, registry, hardware, config)

    attention = providers.Singleton(_resolve, resolver, "attention")
    rotary = providers.Singleton(_resolve, resolver, "rotary")
    kernels = providers.Singleton(_resolve, resolver, "kernels")
    memory = providers.Singleton(_resolve, resolver, "memory")
    kv_cache = providers.Singleton(_resolve, resolver, "kv_cache")


class VisionStage(containers.DeclarativeContainer):
    """Stage 1: the vision encoder's plugins."""

    attention = providers.Dependency(instance_of=AttentionBackend)
    rotary = providers.Dependency(instance_of=RotaryBackend)
    kernels = providers.Dependency(instance_of=KernelsBackend)


class FeatureStage(containers.DeclarativeContainer):
    """Stage 2: conditional feature extraction; per-image results are cached by content."""

    max_cached_images = providers.Object(16)


class DecoderStage(containers.DeclarativeContainer):
    """Stage 3: the text decoder's plugins and its KV-cache factory."""

    attention = providers.Dependency(instance_of=AttentionBackend)
    rotary = providers.Dependency(instance_of=RotaryBackend)
    kernels = providers.Dependency(instance_of=KernelsBackend)
    kv_cache = providers.Dependency(instance_of=KVCacheBackend)
    memory = providers.Dependency(instance_of=MemoryManager)


class RootContainer(containers.DeclarativeContainer):
    """Composes the core and the three stage containers; tests swap any provider with `.override()`."""

    config = providers.Configuration()
    core = providers.Container(CoreContainer, config=config)
    vision = providers.Container(VisionStage, attention=core.attention, rotary=core.rotary, kernels=core.kernels)
    features = providers.Container(FeatureStage)
    decoder = providers.Container(DecoderStage, attention=core.attention, rotary=core.rotary,
                                  kernels=core.kernels, kv_cache=core.kv_cache, memory=core.memory)


def make_container(plain_cfg: Mapping[str, Any]) -> RootContainer:
    """A root container holding `plain_cfg` (already a plain dict: config enters exactly once)."""
    container = RootContainer()
    container.config.from_dict(dict(plain_cfg))
    return container
