"""cuda_offload_stream: the decision rule (pure, tested on the CPU), its rejections on this machine and on slow links,
the layout the planner sizes from the VRAM budget (memory.vram_budget_gb) and its refusal when even the KV caches
and the layers in flight do not fit, the placement and its shrinking, the streaming mechanics on the CPU (an
immediate copier standing in for the side CUDA stream), and on a CUDA GPU the same tokens and logits as the
resident run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from dependency_injector import providers

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError
from qvl_pipeline.facts import ContextFacts, RunFacts
from qvl_pipeline.hardware.profile import CpuFacts, GpuFacts, HardwareProfile, StorageFacts
from qvl_pipeline.memory_plan import (
    GIB,
    Bandwidths,
    Budgets,
    DoesNotFit,
    MemoryKnobs,
    ModelBytes,
    derive_budgets,
    offload_window,
    plan,
    plan_or_refuse,
    workspace_bytes,
)
from qvl_pipeline.options import build_options
from qvl_pipeline.slots.memory import Placement
from qvl_plugins.memory.cuda_offload_stream import (
    CudaOffloadStreamMemory,
    CudaOffloadStreamOptions,
    ImmediateCopier,
    LayerStreamer,
    smaller_offload_share,
    streaming_reasons,
)
from tests.conftest import make_facts
from tests.plugins.test_memory_plan import hf

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
OPTIONS = CudaOffloadStreamOptions()


MIB = 2 ** 20


def machine(pcie_gb_s: float, cpu_gb_s: float, vram_gb: float = 8.0, vram_budget_gb: float | None = None,
            hf_config: dict | None = None, positions: int | None = None) -> RunFacts:
    """A machine with a GPU on a host link of `pcie_gb_s`, its budgets derived as the run derives them."""
    gpu = GpuFacts(name="test gpu", compute_capability=(8, 9), vram_gb=vram_gb, pcie_gb_s=pcie_gb_s,
                   torch_has_kernels=True)
    cpu = CpuFacts(model="test cpu", physical_cores=8, threads=16, memory_bandwidth_gb_s=cpu_gb_s)
    facts = RunFacts.example(HardwareProfile(name="t", cpu=cpu, ram_gb=32.0, storage=StorageFacts(), gpu=gpu),
                             hf_config, "bfloat16" if hf_config else "float32")
    budgets = derive_budgets(32.0, vram_gb, MemoryKnobs(vram_budget_gb=vram_budget_gb))
    context = facts.context if positions is None else ContextFacts(positions, "test")
    return RunFacts(facts.hardware, facts.model, context, facts.pixels, budgets=budgets)


# ---- the decision rule: stream only when the link beats the CPU's memory bandwidth ---------------------------------

def test_a_laptop_link_loses_to_the_cpu_and_the_rejection_says_why():
    [reason] = streaming_reasons(3.9, 42.7, 1.0)          # MX250 on PCIe 3.0 x4, DDR4-2666
    assert "host link (3.9 GB/s) is slower than 1 × the CPU's memory bandwidth (42.7 GB/s)" in reason
    assert "computing those layers on the CPU is 10.9x faster" in reason


def test_a_link_faster_than_ram_streams_unless_the_margin_asked_for_is_missing():
    assert streaming_reasons(50.0, 40.0, 1.0) == []        # PCIe 5.0 x16 vs DDR4
    [reason] = streaming_reasons(50.0, 40.0, 1.5)
    assert "slower than 1.5 ×" in reason


def test_unknown_bandwidths_are_reasons():
    reasons = streaming_reasons(0.0, 0.0, 1.0)
    assert len(reasons) == 2
    assert "states no gpu.pcie_gb_s" in reasons[0] and "hardware.measure=true" in reasons[1]


def test_validate_rejects_on_this_machine_and_on_slow_links_and_admits_a_fast_one():
    assert CudaOffloadStreamMemory.validate(make_facts(), OPTIONS) == ["needs a CUDA GPU; this machine has none"]
    [reason] = CudaOffloadStreamMemory.validate(machine(pcie_gb_s=12.0, cpu_gb_s=42.7), OPTIONS)
    assert "slower than" in reason
    assert CudaOffloadStreamMemory.validate(machine(pcie_gb_s=64.0, cpu_gb_s=42.7), OPTIONS) == []


@pytest.mark.parametrize("profile", ["i5_sm61_nvme", "gtx1060_6gb", "cuda_ampere"])
def test_the_shipped_gpu_profiles_reject_it_for_their_links(profile):
    container = make_container(load_config([f"hardware={profile}", "memory=auto"]))
    facts = container.core.facts()
    reasons = CudaOffloadStreamMemory.validate(facts, OPTIONS)
    assert reasons                                 # here without a GPU; on the machine itself for the slow link
    assert any("needs" in r or "slower than" in r for r in reasons)


@pytest.mark.parametrize(("pcie", "mode"), [(25.0, "cuda_partial"), (64.0, "cuda_offload_stream")])
def test_the_plan_on_a_described_profile_takes_it_only_where_its_link_admits_it(pcie, mode):
    """8B in bf16 does not fit 12 GB of VRAM (cuda_full); the next chain entry is cuda_offload_stream, planned on the
    profile's machine only when its host link beats the CPU's RAM (51.2 GB/s), else cuda_partial."""
    container = make_container(load_config(["hardware=cuda_ampere", f"hardware.gpu.pcie_gb_s={pcie}", "opt=minimal",
                                            "model=qwen3_vl_8b"]))
    there = container.core.plan().to_dict()["model"]["memory_on_profile"]
    assert there["mode"] == mode
    if mode == "cuda_offload_stream":
        tiers = {run["tier"] for run in there["parts"]["layers"]}
        assert tiers == {"gpu", "pinned"} and there["window_gib"] > 0
        assert there["kv_gib"]["cpu"] == 0 and there["vram_gib"] <= there["budgets"]["vram_gib"]


@pytest.mark.parametrize(("field", "bad"), [("min_speedup", 0), ("min_speedup", -1.0), ("stream_min_bytes", -1),
                                           ("resident_layers", -1)])
def test_bad_options_name_the_key(field, bad):
    with pytest.raises(ConfigError, match=f"cuda_offload_stream.*{field}"):
        build_options(CudaOffloadStreamOptions, {field: bad}, "memory.options.cuda_offload_stream")


# ---- the layout the planner sizes from the VRAM budget (pure, hand-made sizes) ----------------------------------

# 4 layers of 100 MiB, vision 60, embeddings 50, head 80 MiB; 1 KiB of KV per position per layer (1 MiB at 1024).
TOY = ModelBytes(layers=(100 * MIB,) * 4, vision=60 * MIB, vision_block=10 * MIB, vision_depth=3, embed=50 * MIB,
                 head=80 * MIB, kv_per_position=1024, label="toy")
FAST = Bandwidths(ram=10.0, disk=1.0, gpu=40.0, pcie=20.0)


def vram(mib: float) -> Budgets:
    return Budgets(workspace_bytes() + 2 * GIB, int(mib * MIB), "test ram", "test vram")


def test_the_window_is_two_copies_of_the_largest_streamed_layer():
    assert offload_window((10, 30, 20), 0) == 60
    assert offload_window((10, 30, 20), 2) == 40              # only layer 2 streams: it and its next-token copy
    assert offload_window((10, 30, 20), 3) == 0               # everything resident: nothing in flight


def test_vram_holds_the_kv_caches_and_the_window_first_then_head_resident_layers_vision_embeddings():
    # KV 4 MiB + window 200 MiB + head 80 = 284; one resident layer: +100 (window unchanged) = 384; vision 60 = 444.
    p = plan("cuda_offload_stream", TOY, 1024, vram(450), FAST)
    assert p.layers == ("gpu", "pinned", "pinned", "pinned")
    assert (p.head, p.vision, p.embed) == ("gpu", "gpu", "cpu")
    assert p.window == 200 * MIB and p.kv["gpu"] == 4 * MIB and p.kv["cpu"] == 0   # every KV cache in VRAM
    assert p.vram == 4 * MIB + 200 * MIB + 80 * MIB + 100 * MIB + 60 * MIB
    assert p.ram == workspace_bytes() + 300 * MIB + 50 * MIB                      # streamed layers + embeddings
    # Per token 300 MiB cross the link and the GPU reads all 480 MiB; the head is read on the GPU.
    assert p.read_per_token["pinned"] == 300 * MIB and p.read_per_token["gpu"] == 180 * MIB
    link, gpu = 20e9 / (300 * MIB), 40e9 / (480 * MIB)
    assert p.ceilings["pinned"] == pytest.approx(link) and p.ceilings["gpu"] == pytest.approx(gpu)
    assert p.ceiling == pytest.approx(min(link, gpu))


def test_a_budget_that_holds_everything_streams_nothing():
    p = plan("cuda_offload_stream", TOY, 1024, vram(1000), FAST)
    assert p.layers == ("gpu",) * 4 and p.window == 0 and (p.head, p.vision, p.embed) == ("gpu",) * 3


def test_resident_layers_forced_by_the_option():
    p = plan("cuda_offload_stream", TOY, 1024, vram(1000), FAST, resident_layers=1)
    assert p.layers == ("gpu", "pinned", "pinned", "pinned") and p.window == 200 * MIB
    with pytest.raises(DoesNotFit, match="VRAM"):
        plan("cuda_offload_stream", TOY, 1024, vram(300), FAST, resident_layers=2)


def test_when_the_kv_caches_and_the_window_do_not_fit_it_refuses_with_the_numbers_and_a_fix():
    with pytest.raises(ConfigError) as info:               # 8192 positions: KV 32 MiB + window 200 MiB > 220 MiB
        plan_or_refuse("cuda_offload_stream", TOY, 8192, vram(220), FAST)
    message, fix = info.value.message, info.value.hint
    assert "\n" not in message and "\n" not in fix
    assert message.startswith("memory=cuda_offload_stream does not fit: needs 232.0 MiB of VRAM")
    assert "KV 32.0 MiB at 8192 positions + layers in flight 200.0 MiB; test vram" in message
    assert "lower generate.max_context to 5120" in fix and "raise memory.vram_budget_gb to 0.23" in fix


def test_validate_sizes_from_memory_vram_budget_gb_not_from_the_gpus_vram():
    # 2B in bf16 on a 24 GB GPU: fits; with memory.vram_budget_gb=0.5 even the KV caches and two layers do not.
    roomy = machine(pcie_gb_s=64.0, cpu_gb_s=42.7, vram_gb=24.0, hf_config=hf("2b"), positions=8192)
    assert CudaOffloadStreamMemory.validate(roomy, OPTIONS) == []
    tight = machine(pcie_gb_s=64.0, cpu_gb_s=42.7, vram_gb=24.0, vram_budget_gb=0.5, hf_config=hf("2b"),
                    positions=8192)
    [reason] = CudaOffloadStreamMemory.validate(tight, OPTIONS)
    assert "memory=cuda_offload_stream does not fit: needs" in reason and "memory.vram_budget_gb=0.5" in reason
    assert "layers in flight" in reason and "; fix: " in reason
    # The budget also sizes what stays resident: a smaller budget keeps fewer layers in VRAM.
    assert CudaOffloadStreamMemory(roomy).plan().layers.count("gpu") == 28
    middle = machine(pcie_gb_s=64.0, cpu_gb_s=42.7, vram_gb=24.0, vram_budget_gb=3.0, hf_config=hf("2b"),
                     positions=8192)
    resident = CudaOffloadStreamMemory(middle).plan().layers.count("gpu")
    assert 0 < resident < 28


# ---- placement and shrinking ----------------------------------------------------------------------------------------

def test_place_keeps_streamed_layers_in_ram_and_attach_reports_them_computing_on_the_gpu():
    facts = machine(pcie_gb_s=64.0, cpu_gb_s=42.7, vram_gb=0.5 + 1.1, positions=64)
    plugin = CudaOffloadStreamMemory(facts)
    # 1126 MiB of VRAM, the KV cache tiny: window 2 × 256 MiB + head 1 GiB do not fit (head on the CPU); two resident
    # layers do (1024 MiB), then the 64 MiB vision tower, not the 256 MiB embeddings.
    placement = plugin.place([GIB // 4] * 6, vision_bytes=GIB // 16, embed_bytes=GIB // 4, head_bytes=GIB)
    assert placement.layers == ("cuda",) * 2 + ("cpu",) * 4
    assert (placement.head, placement.embed, placement.vision) == ("cpu", "cpu", "cuda")


def test_shrinking_streams_half_the_resident_layers_then_the_fixed_parts_then_gives_up():
    placed = Placement(vision="cuda", embed="cpu", head="cuda", layers=("cuda",) * 4 + ("cpu",) * 4)
    first = smaller_offload_share(placed)
    assert first.layers == ("cuda",) * 2 + ("cpu",) * 6 and first.head == "cuda"
    second = smaller_offload_share(smaller_offload_share(first))
    assert second.layers == ("cpu",) * 8 and (second.vision, second.head) == ("cuda", "cuda")
    last = smaller_offload_share(second)
    assert (last.vision, last.embed, last.head) == ("cpu", "cpu", "cpu")
    assert smaller_offload_share(last) is None                   # the slot moves down its chain


def test_shrink_starts_from_the_placement_place_made_not_the_running_one():
    plugin = CudaOffloadStreamMemory(machine(pcie_gb_s=64.0, cpu_gb_s=42.7))
    placed = Placement(vision="cpu", embed="cpu", head="cpu", layers=("cuda",) * 2 + ("cpu",) * 2)
    running = Placement(vision="cpu", embed="cpu", head="cpu", layers=("cuda",) * 4)
    plugin.placed, plugin.running = placed, running               # what attach records (it needs CUDA)
    assert plugin.shrink(running).layers == ("cuda", "cpu", "cpu", "cpu")


# ---- the streaming mechanics, on the CPU ----------------------------------------------------------------------------

def test_streamed_layers_compute_exactly_what_resident_layers_do():
    pipe = Pipeline.from_overrides(["progress=false", "attention=eager", "kernels=torch_native",
                                    "model.dtype=float32"])
    want = pipe.first_logits("Describe the picture.", pipe.demo_images())
    tokens = pipe.generate("Describe.", max_new_tokens=6)["token_ids"]
    layers = list(pipe.model.model.language_model.layers)
    weight = layers[1].mlp.up_proj.weight
    streamer = LayerStreamer(layers[1:], torch.device("cpu"), ImmediateCopier(torch.device("cpu")), min_bytes=1024,
                             pin=False)                          # layer 0 stays resident, as place() may leave it
    home = weight.data_ptr()
    seen = []
    layers[1].register_forward_pre_hook(lambda m, a: seen.append((weight.data_ptr(), sorted(streamer.pending))))
    try:
        assert streamer.homes[0] and all(h.home.numel() * h.home.element_size() >= 1024 for h in streamer.homes[0])
        assert not any(h.name == "weight" and h.module is layers[1].input_layernorm for h in streamer.homes[0])
        assert not layers[0]._forward_pre_hooks                 # the resident layer is not streamed
        got = pipe.first_logits("Describe the picture.", pipe.demo_images())
        assert torch.equal(got, want)
        assert pipe.generate("Describe.", max_new_tokens=6)["token_ids"] == tokens
        ptr, pending = seen[0]
        assert ptr != home                                      # a copy is swapped in for the forward ...
        assert pending == [1]                                   # ... while the next layer's (2) copy is under way
        assert weight.data_ptr() == home                        # and the layer points home again afterwards
    finally:
        streamer.close()
    assert not layers[2]._forward_pre_hooks and not layers[2]._forward_hooks and weight.data_ptr() == home
    assert torch.equal(pipe.first_logits("Describe the picture.", pipe.demo_images()), want)


# ---- on a CUDA GPU ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (streams and pinned memory)")
def test_on_cuda_the_streamed_run_equals_the_resident_run():
    common = ["progress=false", "attention=eager", "kernels=torch_native", "model.dtype=float32",
              "generate.max_new_tokens=8"]
    resident = Pipeline.from_overrides([*common, "memory=cuda_full"])
    container = make_container(load_config(common))
    facts = container.core.facts()
    fast = machine(pcie_gb_s=64.0, cpu_gb_s=1.0, vram_gb=facts.hardware.gpu.vram_gb)
    plugin = CudaOffloadStreamMemory(dataclasses.replace(facts, hardware=fast.hardware, budgets=fast.budgets),
                                     CudaOffloadStreamOptions(stream_min_bytes=1024, resident_layers=1),
                                     name="cuda_offload_stream")
    container.core.memory.override(providers.Object(plugin))
    streamed = Pipeline.from_container(container)
    assert set(streamed.loaded.placement.layers) == {"cuda"}
    assert all(d.type == "cuda" for d in streamed.model.layer_devices())       # the KV cache lives on the GPU
    layers = streamed.model.model.language_model.layers
    assert layers[0].mlp.up_proj.weight.device.type == "cuda"                # resident_layers=1
    big = layers[1].mlp.up_proj.weight
    assert big.device.type == "cpu" and big.is_pinned()                        # home: pinned RAM
    want = resident.first_logits("Describe the picture.", resident.demo_images())
    got = streamed.first_logits("Describe the picture.", streamed.demo_images())
    assert (got.cpu() - want.cpu()).abs().max() <= 1e-5
    assert streamed.generate("Describe.")["token_ids"] == resident.generate("Describe.")["token_ids"]
