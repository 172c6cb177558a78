"""Runtime recovery: a step failed while running, and the request goes on from the preserved KV cache.

- An attention or rotary plugin failed (a kernel error, "no kernel image"): that slot moves along its chain and its
  guard is re-pointed, so every layer uses the next plugin.
- Out of memory (a CUDA out-of-memory, or a `MemoryBudgetExceeded` a memory plugin raised): what the step allocated
  is freed, the memory plugin gives a smaller GPU share (`MemoryManager.shrink`), or the memory slot moves down its
  chain when it has none; the model's parts and every live KV cache move there keeping their contents.

The engine restores the cache to its length before the step and retries the step; the plan records what happened.
"""

from __future__ import annotations

import gc
import sys
import traceback
from collections.abc import Callable, Mapping

import torch

from qvl_pipeline.errors import PluginError, PluginRuntimeError
from qvl_pipeline.generation.engine import OUT_OF_MEMORY, describe_failure
from qvl_pipeline.plan import RunPlan
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.runtime.assembly import (
    KVCaches,
    LoadedModel,
    model_parts,
    move_parts,
    part_sizes,
    settle_decode_step,
)
from qvl_pipeline.slots import KernelsBackend, MemoryManager, Placement, Plugin
from qvl_pipeline.slots.memory_share import gpu_bytes, placement_changes

GUARDED_SLOTS = ("attention", "rotary")   # pure-compute slots that can move along their chain mid-request
# Shrinks asked of one memory plugin before it counts as not shrinking (each must hand back a smaller GPU share).
MAX_SHRINKS = 64


def tell_stderr(line: str) -> None:
    print(f"qvl-pipeline: {line}", file=sys.stderr)


def out_of_memory_cause(failure: BaseException) -> BaseException | None:
    """The out-of-memory error behind `failure` (raised directly, or wrapped by a slot guard), else None."""
    error = failure.error if isinstance(failure, PluginRuntimeError) else failure
    return error if isinstance(error, OUT_OF_MEMORY) else None


def release_step(failure: BaseException) -> None:
    """Free what a failed step allocated: the tensors its finished frames still hold through the exception's
    traceback, then the CUDA allocator's cached blocks."""
    seen: set[int] = set()
    error: BaseException | None = failure
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Recovery:
    """Called by the engine with a runtime failure and the step it interrupted; returns what it changed, or raises
    (the failure again when nothing applies, PluginError when the slot's chain is exhausted)."""

    def __init__(self, resolver: Resolver, guards: Mapping[str, Plugin], loaded: LoadedModel, caches: KVCaches,
                 plan: RunPlan, notify: Callable[[str], None] = tell_stderr) -> None:
        self.resolver = resolver
        self.guards = guards
        self.loaded = loaded
        self.caches = caches
        self.plan = plan
        self.notify = notify

    def __call__(self, failure: BaseException, where: str = "a step") -> str:
        oom = out_of_memory_cause(failure)
        if oom is not None:
            release_step(failure)
            action = self._less_gpu(oom)
        elif isinstance(failure, PluginRuntimeError) and failure.slot in self.guards:
            replacement = self.resolver.fallback(failure.slot, failure.error)
            self.guards[failure.slot].retarget(replacement)
            action = f"continuing with {failure.slot}={replacement.name}"
        else:
            raise failure
        self.plan.record_recovery(where, describe_failure(failure), action)
        self.notify(f"{where}: {describe_failure(failure)}; {action}")
        return action

    # ---- out of memory -------------------------------------------------------------------------------------------
    def _less_gpu(self, error: BaseException) -> str:
        """Move the model to a placement with a smaller GPU share and the live KV caches with it; what moved."""
        model = self.loaded.model
        layers = model_parts(model)           # the decoder layers, with the other parts for streaming plugins
        current = self.loaded.placement
        before = self.resolver.resolve("memory")
        assert isinstance(before, MemoryManager)
        memory, target = self._smaller(before, current, error)
        before.detach(layers)
        move_parts(model, target)
        running = memory.attach(layers, target)
        self.loaded.placement = running
        kernels = self.resolver.resolve("kernels")
        assert isinstance(kernels, KernelsBackend)
        self.loaded.decode_step = settle_decode_step(model, memory, kernels)
        try:
            self.caches.relocate()
        except NotImplementedError as exc:
            raise PluginError(f"kv_cache plugin {self.caches.backend.name!r} cannot move its cache after the layers "
                              "moved (its KVCache has no relocate())",
                              "implement KVCache.relocate in that plugin, or choose kv_cache=static") from exc
        release_step(error)
        how = (f"memory {before.name} gave a smaller GPU share" if memory is before
               else f"memory slot moved from {before.name} to {memory.name}")
        if running == current:
            return f"{how}; no part changed device"
        return f"{how}: moved {placement_changes(current, running)}; KV caches moved with their layers, contents kept"

    def _smaller(self, memory: MemoryManager, current: Placement,
                 error: BaseException) -> tuple[MemoryManager, Placement]:
        """The memory plugin and a placement holding less on the GPU than `current`: the plugin's own smaller share,
        else the next plugin of the chain (its placement shrunk until it holds no more than `current`)."""
        sizes = part_sizes(self.loaded.model)
        limit = gpu_bytes(current, *sizes)
        candidate = memory.shrink(current)
        for _ in range(MAX_SHRINKS):
            if candidate is None:
                nxt = self.resolver.fallback("memory", error)     # PluginError once the chain is exhausted
                assert isinstance(nxt, MemoryManager)
                memory, candidate = nxt, nxt.place(*sizes)
            elif gpu_bytes(candidate, *sizes) > limit or (candidate == current and limit > 0):
                candidate = memory.shrink(candidate)
            else:
                return memory, candidate
        raise PluginError(f"memory plugin {memory.name!r} did not hand back a smaller GPU share after "
                          f"{MAX_SHRINKS} requests", "fix its shrink(), or choose another memory plugin")
