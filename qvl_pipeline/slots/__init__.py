"""Slot interfaces: the only plugin-facing API the model math and the plugins import."""

from qvl_pipeline.facts import ContextFacts, ModelFacts, RunFacts
from qvl_pipeline.slots.attention import AttentionBackend
from qvl_pipeline.slots.base import Fidelity, NoOptions, Plugin, SelfTestError
from qvl_pipeline.slots.kernels import KernelsBackend
from qvl_pipeline.slots.kv_cache import CacheShape, ContextOverflowError, Int8Rows, KVCache, KVCacheBackend
from qvl_pipeline.slots.memory import MemoryManager, Placement
from qvl_pipeline.slots.rotary import RotaryBackend

SLOTS: dict[str, type[Plugin]] = {
    "attention": AttentionBackend,
    "rotary": RotaryBackend,
    "kernels": KernelsBackend,
    "memory": MemoryManager,
    "kv_cache": KVCacheBackend,
}

__all__ = [
    "SLOTS", "AttentionBackend", "CacheShape", "ContextFacts", "ContextOverflowError", "Fidelity", "Int8Rows",
    "KVCache", "KVCacheBackend", "KernelsBackend", "MemoryManager", "ModelFacts", "NoOptions", "Placement", "Plugin",
    "RotaryBackend", "RunFacts", "SelfTestError",
]
