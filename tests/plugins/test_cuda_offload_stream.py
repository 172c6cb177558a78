"""cuda_offload_stream: the decision rule (pure, tested on the CPU), its rejections on this machine and on slow links,
the placement, the streaming mechanics on the CPU (an immediate copier standing in for the side CUDA stream), and on
a CUDA GPU the same tokens and logits as the resident run."""

from __future__ import annotations

import pytest
import torch
from dependency_injector import providers

from qvl_pipeline import Pipeline
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError
from qvl_pipeline.facts import RunFacts
from qvl_pipeline.hardware.profile import CpuFacts, GpuFacts, HardwareProfile, StorageFacts
from qvl_pipeline.options import build_options
from qvl_plugins.memory.budget import GIB
from qvl_plugins.memory.cuda_offload_stream import (
    CudaOffloadStreamMemory,
    CudaOffloadStreamOptions,
    ImmediateCopier,
    LayerStreamer,
    resident_parts,
    streaming_reasons,
)
from tests.conftest import make_facts

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
OPTIONS = CudaOffloadStreamOptions()


def machine(pcie_gb_s: float, cpu_gb_s: float, vram_gb: float = 8.0) -> RunFacts:
    gpu = GpuFacts(name="test gpu", compute_capability=(8, 9), vram_gb=vram_gb, pcie_gb_s=pcie_gb_s,
                   torch_has_kernels=True)
    cpu = CpuFacts(model="test cpu", physical_cores=8, threads=16, memory_bandwidth_gb_s=cpu_gb_s)
    return RunFacts.example(HardwareProfile(name="t", cpu=cpu, ram_gb=32.0, storage=StorageFacts(), gpu=gpu))


# ---- the decision rule: stream only when the link beats the CPU's memory bandwidth ---------------------------------

def test_a_laptop_link_loses_to_the_cpu_and_the_rejection_says_why():
    [reason] = streaming_reasons(3.9, 42.7, 1.0, GIB // 8, 1.5 * GIB)          # MX250 on PCIe 3.0 x4, DDR4-2666
    assert "host link (3.9 GB/s) is slower than 1 × the CPU's memory bandwidth (42.7 GB/s)" in reason
    assert "computing those layers on the CPU is 10.9x faster" in reason


def test_a_link_faster_than_ram_streams_unless_the_margin_asked_for_is_missing():
    assert streaming_reasons(50.0, 40.0, 1.0, GIB // 8, 1.5 * GIB) == []        # PCIe 5.0 x16 vs DDR4
    [reason] = streaming_reasons(50.0, 40.0, 1.5, GIB // 8, 1.5 * GIB)
    assert "slower than 1.5 ×" in reason


def test_unknown_bandwidths_and_a_vram_too_small_for_two_layers_are_reasons():
    reasons = streaming_reasons(0.0, 0.0, 1.0, GIB, 1.5 * GIB)
    assert len(reasons) == 3
    assert "states no gpu.pcie_gb_s" in reasons[0] and "hardware.measure=true" in reasons[1]
    assert "2 decoder layers (2.00 GiB) do not fit in the 1.50 GiB" in reasons[2]


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


@pytest.mark.parametrize(("field", "bad"), [("min_speedup", 0), ("min_speedup", -1.0), ("stream_min_bytes", -1)])
def test_bad_options_name_the_key(field, bad):
    with pytest.raises(ConfigError, match=f"cuda_offload_stream.*{field}"):
        build_options(CudaOffloadStreamOptions, {field: bad}, "memory.options.cuda_offload_stream")


# ---- placement --------------------------------------------------------------------------------------------------

def test_fixed_parts_stay_on_the_gpu_while_they_fit_beside_two_layers_in_flight():
    assert resident_parts(100, [20] * 4, vision_bytes=30, embed_bytes=20, head_bytes=20) == \
        {"head": True, "embed": True, "vision": False}          # 100 - 2×20 = 60: head 20, embed 20, vision 30 > 20
    assert resident_parts(30, [20] * 4, 1, 1, 1) == {"head": False, "embed": False, "vision": False}


def test_place_keeps_the_layers_in_ram_and_attach_reports_them_computing_on_the_gpu():
    plugin = CudaOffloadStreamMemory(machine(pcie_gb_s=64.0, cpu_gb_s=42.7, vram_gb=0.5 + 1.0))
    placement = plugin.place([GIB // 4] * 6, vision_bytes=GIB // 4, embed_bytes=GIB // 4, head_bytes=GIB)
    assert placement.layers == ("cpu",) * 6
    assert (placement.head, placement.embed, placement.vision) == ("cpu", "cuda", "cuda")
    assert plugin.shrink(placement) is None                    # out of memory: the slot moves down its chain


# ---- the streaming mechanics, on the CPU ----------------------------------------------------------------------------

def test_streamed_layers_compute_exactly_what_resident_layers_do():
    pipe = Pipeline.from_overrides(["progress=false", "attention=eager", "kernels=torch_native",
                                    "model.dtype=float32"])
    want = pipe.first_logits("Describe the picture.", pipe.demo_images())
    tokens = pipe.generate("Describe.", max_new_tokens=6)["token_ids"]
    layers = list(pipe.model.model.language_model.layers)
    weight = layers[1].mlp.up_proj.weight
    streamer = LayerStreamer(layers, torch.device("cpu"), ImmediateCopier(torch.device("cpu")), min_bytes=1024,
                             pin=False)
    home = weight.data_ptr()
    seen = []
    layers[1].register_forward_pre_hook(lambda m, a: seen.append((weight.data_ptr(), sorted(streamer.pending))))
    try:
        assert streamer.homes[1] and all(h.home.numel() * h.home.element_size() >= 1024 for h in streamer.homes[1])
        assert not any(h.name == "weight" and h.module is layers[1].input_layernorm for h in streamer.homes[1])
        got = pipe.first_logits("Describe the picture.", pipe.demo_images())
        assert torch.equal(got, want)
        assert pipe.generate("Describe.", max_new_tokens=6)["token_ids"] == tokens
        ptr, pending = seen[0]
        assert ptr != home                                      # a copy is swapped in for the forward ...
        assert pending == [2]                                   # ... while the next layer's copy is under way
        assert weight.data_ptr() == home                        # and the layer points home again afterwards
    finally:
        streamer.close()
    assert not layers[0]._forward_pre_hooks and not layers[0]._forward_hooks and weight.data_ptr() == home
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
    plugin = CudaOffloadStreamMemory(RunFacts(fast.hardware, facts.model, facts.context, facts.pixels),
                                     CudaOffloadStreamOptions(stream_min_bytes=1024), name="cuda_offload_stream")
    container.core.memory.override(providers.Object(plugin))
    streamed = Pipeline.from_container(container)
    assert set(streamed.loaded.placement.layers) == {"cuda"}
    assert all(d.type == "cuda" for d in streamed.model.layer_devices())       # the KV cache lives on the GPU
    big = streamed.model.model.language_model.layers[0].mlp.up_proj.weight
    assert big.device.type == "cpu" and big.is_pinned()                        # home: pinned RAM
    want = resident.first_logits("Describe the picture.", resident.demo_images())
    got = streamed.first_logits("Describe the picture.", streamed.demo_images())
    assert (got.cpu() - want.cpu()).abs().max() <= 1e-5
    assert streamed.generate("Describe.")["token_ids"] == resident.generate("Describe.")["token_ids"]
