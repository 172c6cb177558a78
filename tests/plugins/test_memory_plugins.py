"""The memory plugins against RunFacts and the memory.* knobs: validate with the chosen kernels' weight bytes, the
refusals and their fixes, the plan printed by task=plan."""

from __future__ import annotations

import dataclasses

import pytest

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError, PluginError
from qvl_pipeline.memory_plan import GIB, MemoryKnobs, derive_budgets
from qvl_pipeline.plan import render_plan
from qvl_pipeline.weight_format import int8_suggestion
from qvl_plugins.memory.cpu import CpuMemory
from qvl_plugins.memory.cuda_partial import CudaPartialMemory, CudaPartialOptions
from qvl_plugins.memory.ssd_stream import SsdStreamMemory, SsdStreamOptions
from tests.conftest import PASCAL, make_facts
from tests.plugins.test_memory_plan import hf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def facts_for(size: str, ram_gb: float = 16.0, gpu=None, weights=None, ram_budget_gb=None, positions=8192):
    base = make_facts(gpu=gpu, hf_config=hf(size), stored_dtype="bfloat16", ram_gb=ram_gb)
    vram = gpu.vram_gb if gpu else None
    budgets = derive_budgets(ram_gb, vram, MemoryKnobs(ram_budget_gb=ram_budget_gb))
    return dataclasses.replace(base, weights=weights, budgets=budgets,
                               context=dataclasses.replace(base.context, positions=positions))


def test_cpu_validates_with_the_weight_bytes_of_the_chosen_format():
    # 8B in bf16 (16.3 GiB) does not fit 16 GiB of RAM; in int8 (8.8 GiB) it does.
    (reason,) = CpuMemory.validate(facts_for("8b"), None)
    assert reason.startswith("memory=cpu does not fit: needs ")
    assert "fix: use int8 weights (opt=moderate kernels=int8_weight_only)" in reason and "\n" not in reason
    assert CpuMemory.validate(facts_for("8b", weights=int8_suggestion("bfloat16")), None) == []


def test_the_ram_budget_knob_binds_every_plugin():
    small = facts_for("2b", weights=int8_suggestion("bfloat16"), ram_budget_gb=2.0, positions=1024)
    (reason,) = CpuMemory.validate(small, None)
    assert "memory.ram_budget_gb=2" in reason and "use memory=ssd_stream" in reason
    assert SsdStreamMemory.validate(small, SsdStreamOptions()) == []
    plan = SsdStreamMemory(small).plan()
    assert plan.ram <= 2 * GIB and "disk" in plan.layers


def test_ssd_stream_refuses_weights_converted_in_memory_only_when_something_must_stay_on_disk():
    fp32 = dataclasses.replace(int8_suggestion("bfloat16"), file_backed=False, name="fp32 copy")
    (reason,) = SsdStreamMemory.validate(facts_for("2b", weights=fp32, ram_budget_gb=2.0, positions=1024),
                                         SsdStreamOptions())
    assert "converted in memory" in reason
    assert SsdStreamMemory.validate(facts_for("2b", weights=fp32, positions=1024), SsdStreamOptions()) == []


def test_cuda_partial_plans_leading_layers_on_the_gpu():
    facts = facts_for("2b", gpu=PASCAL, weights=int8_suggestion("bfloat16"))
    assert CudaPartialMemory.validate(facts, CudaPartialOptions()) == []
    plan = CudaPartialMemory(facts).plan()
    assert plan.vision == "gpu" and plan.layers[0] == "gpu" and plan.layers[-1] == "cpu"
    assert plan.vram <= facts.memory_budgets.vram
    forced = CudaPartialMemory(facts, CudaPartialOptions(gpu_layers=2)).plan()
    assert forced.layers.count("gpu") == 2
    assert CudaPartialMemory.validate(facts_for("2b"), CudaPartialOptions()) == ["needs a CUDA GPU; this machine "
                                                                                 "has none"]


def test_placement_from_a_plan_names_the_parts_on_disk():
    plan = SsdStreamMemory(facts_for("2b", weights=int8_suggestion("bfloat16"), ram_budget_gb=1.5,
                                     positions=1024)).plan()
    from qvl_pipeline.slots.memory import Placement

    placement = Placement.from_plan(plan)
    assert placement.layers == ("cpu",) * 28
    assert {f"layers.{i}" for i in placement.streamed_layers} <= placement.on_disk
    assert "disk (computed on cpu)" in placement.summary()


@pytest.mark.parametrize(("override", "needle"), [
    ("memory.ram_budget_gb=0", "memory.ram_budget_gb=0.0 is out of range"),
    ("memory.ram_budget_gb=-2", "memory.ram_budget_gb=-2.0 is out of range"),
    ("memory.vram_budget_gb=0", "memory.vram_budget_gb=0.0 is out of range"),
    ("memory.reserve_gb=-1", "memory.reserve_gb=-1.0 is out of range"),
    ("memory.reserve_gb=nan", "memory.reserve_gb=nan is out of range"),
    ("memory.ram_budget_gb=lots", "bad config or override"),
])
def test_bad_memory_knobs_are_config_errors(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_config([override])


def test_bad_ssd_stream_option_is_a_config_error():
    container = make_container(load_config(["memory=ssd_stream", "memory.options.ssd_stream.ahead=0"]))
    with pytest.raises(ConfigError, match="ahead must be ≥ 1"):
        container.core.resolver().resolve("memory")


def test_explicit_cpu_that_does_not_fit_fails_with_the_fix():
    container = make_container(load_config(["task=plan", "model=qwen3_vl_8b", "hardware=i5_sm61_nvme",
                                            "hardware.emulate=true", "opt=minimal", "memory=cpu"]))
    with pytest.raises(PluginError) as exc:
        container.core.resolver().resolve("memory")
    assert "memory=cpu does not fit" in exc.value.message and "int8 weights" in exc.value.message


@pytest.mark.parametrize("opt", ["moderate", "aggressive"])
def test_the_8b_plan_fits_the_laptop(opt):
    """hardware=i5_sm61_nvme hardware.emulate=true model=qwen3_vl_8b: within 16 GiB of RAM here, and on the
    profile's own machine within 16 GiB + the MX250's 2 GiB."""
    container = make_container(load_config(["task=plan", "model=qwen3_vl_8b", "hardware=i5_sm61_nvme",
                                            "hardware.emulate=true", f"opt={opt}"]))
    plan = container.core.plan().to_dict()
    mem = plan["model"]["memory"]
    assert mem["ram_gib"] <= mem["budgets"]["ram_gib"] <= 16
    there = plan["model"]["memory_on_profile"]
    assert there["mode"] == "cuda_partial" and there["vram_gib"] <= there["budgets"]["vram_gib"] <= 2
    assert there["ram_gib"] <= 16 - 1.5
    text = render_plan(plan)
    assert "memory plan (memory=" in text and "on i5_sm61_nvme as described" in text
    assert "decode ceiling:" in text


def test_an_explicit_ram_budget_bounds_the_default_context():
    free = make_container(load_config(["model=qwen3_vl_2b", "hardware=i5_sm61_nvme", "opt=minimal"])).core.facts()
    tight = make_container(load_config(["model=qwen3_vl_2b", "hardware=i5_sm61_nvme", "opt=minimal",
                                        "memory.ram_budget_gb=6"])).core.facts()
    assert tight.context.positions < free.context.positions
    assert "memory.ram_budget_gb" in tight.context.reason
