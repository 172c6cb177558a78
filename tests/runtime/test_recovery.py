"""Runtime recovery from out-of-memory: a step that raises a CUDA out-of-memory (or a MemoryBudgetExceeded) mid-way is
retried from the preserved KV cache after the memory plugin gives a smaller GPU share or the memory slot moves down
its chain; the request completes with the tokens of a run without the fault, the cache stays consistent, the plan
records what happened. Faults come from memory plugins registered through the registry override."""

from __future__ import annotations

import weakref
from typing import ClassVar

import pytest
import torch

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import MemoryBudgetExceeded, PluginError
from qvl_pipeline.memory_plan import GIB
from qvl_pipeline.registry import PluginRegistry
from qvl_pipeline.runtime.pipeline import Conversation
from qvl_pipeline.runtime.recovery import out_of_memory_cause, release_step
from qvl_pipeline.slots import Fidelity
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.memory.cpu import CpuMemory

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BASE = ["progress=false", "generate.max_new_tokens=6", "opt=moderate", "attention=eager", "kv_cache=static"]


class OomOnce(CpuMemory):
    """The reference placement with a fault: decoder layer 1 raises `error` on its `at`-th call, once (mid-step:
    layer 0 has already written its keys/values for the step). Counts are per class (reset by the tests)."""

    fidelity = Fidelity.EXACT
    summary = "fake: out of memory once"
    at = 3                      # layer 1's calls: 1 = the prefill, 2 = decode step 1, 3 = decode step 2
    error: type[BaseException] = torch.OutOfMemoryError
    calls = 0
    attached: ClassVar[list[str]] = []

    def attach(self, layers, placement):
        def hook(module, args):
            type(self).calls += 1
            if type(self).calls == self.at:
                raise self.error("injected: CUDA out of memory. Tried to allocate 20.00 MiB")
        self._handle = layers[1].register_forward_pre_hook(hook)
        type(self).attached.append(self.name)
        return placement

    def detach(self, layers):
        self._handle.remove()


class OomAlways(OomOnce):
    """Every call of layer 1 runs out of memory."""

    summary = "fake: always out of memory"

    def attach(self, layers, placement):
        def hook(module, args):
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        self._handle = layers[1].register_forward_pre_hook(hook)
        return placement


class BudgetOnceShrinks(OomOnce):
    """Its budget is exceeded once during the prefill; it has a smaller share to give (counted)."""

    summary = "fake: budget exceeded once, shrinks"
    at = 1
    error = MemoryBudgetExceeded
    shrinks = 0

    def shrink(self, placement):
        type(self).shrinks += 1
        return placement          # all on the CPU already: no GPU share to compare, so it is taken as is


class OomInAttention(EagerAttention):
    """Attention that runs out of memory once when armed: the slot guard wraps it, recovery must treat it as memory."""

    fidelity = Fidelity.EXACT
    summary = "fake: out of memory inside attention"
    armed = False

    def attend(self, q, k, v, *, causal, scale):
        if type(self).armed:
            type(self).armed = False
            raise torch.OutOfMemoryError("injected: CUDA out of memory in attention")
        return super().attend(q, k, v, causal=causal, scale=scale)


FAULTS = {"oom_once": OomOnce, "oom_always": OomAlways, "budget_once": BudgetOnceShrinks}


def build(*overrides: str, extra_attention: type | None = None, **choices: str) -> Pipeline:
    """The demo pipeline with the fault plugins registered; `choices` pick plugins explicitly (slot=name: a
    registered-in-code plugin is no Hydra group option, so the typed config is set directly)."""
    config = load_config([*BASE, *overrides])
    for slot, name in choices.items():
        getattr(config, slot).choice = name
    container = make_container(config)
    registry = PluginRegistry(discover=None)
    for name, cls in FAULTS.items():
        registry.register("memory", name, cls)
    if extra_attention is not None:
        registry.register("attention", "oom_in_attention", extra_attention)
    container.core.registry.override(registry)
    return Pipeline.from_container(container)


@pytest.fixture(autouse=True)
def _reset_counts():
    OomOnce.calls = BudgetOnceShrinks.calls = BudgetOnceShrinks.shrinks = 0
    OomOnce.attached = []
    OomInAttention.armed = False


@pytest.fixture(scope="module")
def reference():
    return Pipeline.from_overrides([*BASE, "memory=cpu"])


def test_oom_mid_decode_moves_the_memory_slot_down_its_chain_and_the_tokens_are_unchanged(reference):
    pipe = build("hardware.chains.memory=[oom_once,cpu]")
    layer = pipe.model.model.language_model.layers[1]
    assert layer._forward_pre_hooks                                     # the fault plugin is attached
    result = pipe.generate("Describe.", max_new_tokens=6)
    assert result["token_ids"] == reference.generate("Describe.", max_new_tokens=6)["token_ids"]
    assert len(result["token_ids"]) == 6 and OomOnce.calls >= 3
    [line] = result["runtime_fallbacks"]
    assert line.startswith("decode step 2") and "OutOfMemoryError" in line and "oom_once to cpu" in line
    memory = result["plan"]["slots"]["memory"]
    assert memory["chosen"] == "cpu"
    assert any(r["stage"] == "runtime" and r["plugin"] == "oom_once" and "OutOfMemoryError" in r["reasons"][0]
               for r in memory["rejected"])
    [event] = result["plan"]["runtime_recoveries"]
    assert event["where"].startswith("decode step 2") and "moved from oom_once to cpu" in event["action"]
    assert not layer._forward_pre_hooks                                 # detached when the slot moved on


def test_a_budget_exceeded_in_the_prefill_takes_the_plugins_smaller_share_and_keeps_the_slot(reference):
    pipe = build("hardware.chains.memory=[budget_once,cpu]")
    relocations = []
    relocate = pipe.caches.relocate
    pipe.caches.relocate = lambda: (relocations.append(1), relocate())[1]
    result = pipe.generate("Describe.", max_new_tokens=5)
    assert result["token_ids"] == reference.generate("Describe.", max_new_tokens=5)["token_ids"]
    assert BudgetOnceShrinks.shrinks == 1 and relocations == [1]
    assert result["plan"]["slots"]["memory"]["chosen"] == "budget_once"
    assert not any(r["stage"] == "runtime" for r in result["plan"]["slots"]["memory"]["rejected"])
    [event] = result["plan"]["runtime_recoveries"]
    assert event["where"].startswith("the prefill") and "MemoryBudgetExceeded" in event["failure"]
    assert "budget_once gave a smaller GPU share" in event["action"]
    assert BudgetOnceShrinks.attached == ["budget_once", "budget_once"]    # detached, re-attached


def test_a_chat_turn_recovers_with_a_consistent_cache(reference):
    OomOnce.at = 4                        # layer 1: turn 1 prefill + 2 decode steps, then turn 2's prefill
    try:
        pipe = build("hardware.chains.memory=[oom_once,cpu]")
        faulty, clean = Conversation(), Conversation()
        for text in ("Hello.", "And then?"):
            got = pipe.chat_turn(faulty, text, max_new_tokens=3)
            want = reference.chat_turn(clean, text, max_new_tokens=3)
            assert got["token_ids"] == want["token_ids"]
    finally:
        OomOnce.at = 3
    assert got["runtime_fallbacks"] and got["runtime_fallbacks"][0].startswith("the prefill")
    assert got["cached_prompt_tokens"] == want["cached_prompt_tokens"] > 0   # the first turn's cache was kept
    assert faulty.cache.length == clean.cache.length == len(faulty.cached_ids)
    n = faulty.cache.length
    for layer in range(faulty.cache.shape.layers):                    # every committed position equals the clean run's
        assert torch.equal(faulty.cache.keys[layer][:, :, :n], clean.cache.keys[layer][:, :, :n])
        assert torch.equal(faulty.cache.values[layer][:, :, :n], clean.cache.values[layer][:, :, :n])


def test_an_oom_inside_a_guarded_slot_is_a_memory_problem_not_an_attention_one(reference):
    pipe = build("hardware.chains.memory=[budget_once,cpu]", extra_attention=OomInAttention,
                 attention="oom_in_attention")
    BudgetOnceShrinks.at = 0                                            # the memory fault never fires
    try:
        OomInAttention.armed = True
        result = pipe.generate("Describe.", max_new_tokens=4)
    finally:
        BudgetOnceShrinks.at = 1
    assert result["token_ids"] == reference.generate("Describe.", max_new_tokens=4)["token_ids"]
    assert result["plan"]["slots"]["attention"]["chosen"] == "oom_in_attention"
    [event] = result["plan"]["runtime_recoveries"]
    assert "attention plugin 'oom_in_attention' failed: OutOfMemoryError" in event["failure"]
    assert "budget_once gave a smaller GPU share" in event["action"]


def test_an_exhausted_memory_chain_is_an_error_naming_every_reason():
    pipe = build("hardware.chains.memory=[oom_always]")
    with pytest.raises(PluginError, match=r"(?s)no usable memory plugin.*oom_always: failed while running: "
                                          r"OutOfMemoryError"):
        pipe.generate("Describe.", max_new_tokens=2)


def test_an_explicit_memory_plugin_that_runs_out_of_memory_says_to_drop_the_override():
    pipe = build(memory="oom_always")
    with pytest.raises(PluginError, match="chosen explicitly and failed while running") as info:
        pipe.generate("Describe.", max_new_tokens=2)
    assert "memory=oom_always" in info.value.hint


def test_release_step_frees_what_the_failed_step_held():
    held = []

    def step():
        activations = torch.empty(1024)
        held.append(weakref.ref(activations))
        raise torch.OutOfMemoryError("injected")

    try:
        step()
    except torch.OutOfMemoryError as failure:
        assert held[0]() is not None                                 # the traceback keeps the step's frame alive
        release_step(failure)
        assert held[0]() is None


def test_out_of_memory_is_recognised_raw_or_wrapped_by_a_guard():
    from qvl_pipeline.errors import PluginRuntimeError

    oom = torch.OutOfMemoryError("x")
    assert out_of_memory_cause(oom) is oom
    assert out_of_memory_cause(PluginRuntimeError("attention", "a", oom)) is oom
    assert isinstance(out_of_memory_cause(MemoryBudgetExceeded("over")), MemoryBudgetExceeded)
    assert out_of_memory_cause(PluginRuntimeError("attention", "a", RuntimeError("no kernel image"))) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuda_partial moves layers off it)")
def test_cuda_partial_out_of_memory_moves_layers_and_their_cache_to_the_cpu():
    from qvl_plugins.memory.cuda_partial import CudaPartialMemory

    class PartialOomOnce(CudaPartialMemory):
        summary = "fake: cuda_partial, out of memory once"
        calls = 0

        def attach(self, layers, placement):
            def hook(module, args):
                type(self).calls += 1
                if type(self).calls == 3:
                    raise torch.OutOfMemoryError("injected: CUDA out of memory (tiny budget)")
            self._handle = layers[-1].register_forward_pre_hook(hook)
            return placement

        def detach(self, layers):
            self._handle.remove()

    common = [*BASE, "model.dtype=float32", "kernels=torch_native"]
    container = make_container(load_config([*common, "hardware.chains.memory=[partial_oom,cpu]"]))
    registry = PluginRegistry(discover=None)
    registry.register("memory", "partial_oom", PartialOomOnce)
    container.core.registry.override(registry)
    pipe = Pipeline.from_container(container)
    assert all(d == "cuda" for d in pipe.loaded.placement.layers)
    result = pipe.generate("Describe.", max_new_tokens=6)
    clean = Pipeline.from_overrides([*common, "memory=cuda_partial"]).generate("Describe.", max_new_tokens=6)
    assert result["token_ids"] == clean["token_ids"]
    layers = pipe.loaded.placement.layers
    assert "cpu" in layers and "cuda" in layers                          # the trailing half moved to the CPU
    assert [d.type for d in pipe.model.layer_devices()] == [torch.device(d).type for d in layers]
    [event] = result["plan"]["runtime_recoveries"]
    assert "partial_oom gave a smaller GPU share" in event["action"] and "cuda -> cpu" in event["action"]


def test_a_cache_that_cannot_follow_its_layers_is_a_plugin_error_naming_the_fix():
    from qvl_pipeline.slots import KVCache
    from qvl_plugins.kv_cache.static import StaticCache, StaticKVCache

    class Unmovable(StaticKVCache):
        relocate = KVCache.relocate                  # the interface's: not implemented (a third-party cache)

    class UnmovableCache(StaticCache):
        fidelity = Fidelity.EXACT

        def create(self, shape, dtype, devices):
            return Unmovable(shape, dtype, devices)

    container = make_container(load_config([*BASE[:-1], "hardware.chains.memory=[oom_once,cpu]",
                                            "hardware.chains.kv_cache=[unmovable]"]))
    registry = PluginRegistry(discover=None)
    registry.register("memory", "oom_once", OomOnce)
    registry.register("kv_cache", "unmovable", UnmovableCache)
    container.core.registry.override(registry)
    with pytest.raises(PluginError, match="'unmovable' cannot move its cache") as info:
        Pipeline.from_container(container).generate("Describe.", max_new_tokens=4)
    assert "kv_cache=static" in info.value.hint


def test_a_run_over_its_ram_budget_moves_from_cpu_to_ssd_stream_with_the_same_tokens(reference, monkeypatch):
    from qvl_plugins.memory import ram_guard

    pipe = build("hardware.chains.memory=[cpu,ssd_stream]", "memory.ram_budget_gb=8")
    assert pipe.plan["slots"]["memory"]["chosen"] == "cpu"
    readings = iter([100 * GIB, 100 * GIB])                  # the prefill's check: over, and still over after a trim
    real = ram_guard.resident_bytes
    monkeypatch.setattr(ram_guard, "resident_bytes", lambda: next(readings, None) or real())
    result = pipe.generate("Describe.", max_new_tokens=5)
    assert result["token_ids"] == reference.generate("Describe.", max_new_tokens=5)["token_ids"]
    [event] = result["plan"]["runtime_recoveries"]
    assert event["where"].startswith("the prefill") and "MemoryBudgetExceeded" in event["failure"]
    assert "over memory.ram_budget_gb=8 GiB + 15%" in event["failure"]
    assert "moved from cpu to ssd_stream" in event["action"]
    assert result["plan"]["slots"]["memory"]["chosen"] == "ssd_stream"


def test_the_ram_guard_trims_the_heap_before_it_counts_a_run_over_budget(monkeypatch):
    from qvl_plugins.memory import ram_guard

    assert ram_guard.resident_bytes() > 0                                  # this process, read from /proc
    guard = ram_guard.RamGuard(budget=GIB)
    readings = iter([2 * GIB, GIB // 2])                        # over, then under once the free heap is handed back
    monkeypatch.setattr(ram_guard, "resident_bytes", lambda: next(readings))
    guard.check()
    monkeypatch.setattr(ram_guard, "resident_bytes", lambda: int(1.1 * GIB))     # within the 15 % tolerance
    guard.check()
    monkeypatch.setattr(ram_guard, "resident_bytes", lambda: 2 * GIB)
    with pytest.raises(MemoryBudgetExceeded, match=r"holds 2\.00 GiB"):
        guard.check()


def test_without_a_ram_budget_the_cpu_plugin_watches_nothing():
    pipe = build("hardware.chains.memory=[cpu]")
    assert not pipe.model.model.language_model.norm._forward_hooks
    guarded = build("hardware.chains.memory=[cpu]", "memory.ram_budget_gb=8")
    assert len(guarded.model.model.language_model.norm._forward_hooks) == 1
