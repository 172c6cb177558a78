"""Profiles: validation naming the field, probing, reconciling a target with this machine, emulation."""

from __future__ import annotations

import copy
import dataclasses
import re

import pytest
import yaml

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.build import build_hardware
from qvl_pipeline.hardware.chains import cpu_chains, derive_chains
from qvl_pipeline.hardware.effective import (
    PIN_ENV,
    apply_threads,
    emulation_env,
    process_env,
    reconcile,
    thread_plan,
)
from qvl_pipeline.hardware.probe import probe_machine, read_cpuinfo, torch_has_kernels_for
from qvl_pipeline.hardware.profile import RUN_SWITCHES, ProfileError, profile_from_dict
from qvl_pipeline.plan import render_plan
from qvl_pipeline.tasks.probe import probe_yaml
from tests.conftest import PASCAL, make_profile

I5 = dataclasses.asdict(load_config(["hardware=i5_sm61_nvme"]).hardware)
AUTO = dataclasses.asdict(load_config([]).hardware)


def profile_dict():
    return {k: copy.deepcopy(v) for k, v in I5.items() if k not in RUN_SWITCHES}


@pytest.mark.parametrize(("mutate", "field"), [
    (lambda d: d.pop("cpu"), "cpu"),
    (lambda d: d.__setitem__("ram_gb", "lots"), "hardware.ram_gb"),
    (lambda d: d["cpu"].__setitem__("physical_cores", 4.5), "hardware.cpu.physical_cores"),
    (lambda d: d["cpu"].__setitem__("cache_l9", 1), "cache_l9"),
    (lambda d: d["gpu"].__setitem__("compute_capability", "6.1"), "hardware.gpu.compute_capability"),
    (lambda d: d["chains"].__setitem__("attention", []), "hardware.chains.attention"),
    (lambda d: d["cpu"].__setitem__("isa", "avx2"), "hardware.cpu.isa"),
])
def test_malformed_profile_names_the_field(mutate, field):
    data = profile_dict()
    mutate(data)
    with pytest.raises(ProfileError, match=re.escape(field)):
        profile_from_dict(data)


def test_malformed_profile_via_config_is_a_config_error():
    bad = dict(I5, ram_gb="sixteen")
    with pytest.raises(ConfigError, match=r"hardware\.ram_gb"):
        build_hardware(bad, lambda path, measure: (make_profile(), []))


def test_cpuinfo_parsing_keeps_known_flags():
    model, isa = read_cpuinfo("model name\t: Intel(R) Core(TM) i5-10210U\nflags\t: fpu sse4_2 avx avx2 fma f16c\n")
    assert model == "Intel(R) Core(TM) i5-10210U" and isa == ("sse4_2", "avx", "avx2", "fma", "f16c")


@pytest.mark.parametrize(("cap", "arch", "ok"), [
    ((6, 1), ["sm_70", "sm_75", "sm_80", "sm_86", "sm_90", "compute_90"], False),   # CUDA 12.8+ wheels
    ((6, 1), ["sm_50", "sm_60", "sm_61", "sm_70"], True),                          # CUDA 12.6 wheels
    ((6, 1), ["sm_60"], True),
    ((6, 1), ["compute_50"], True),
    ((8, 6), ["sm_80"], True),
    ((7, 5), ["sm_80", "compute_80"], False),
])
def test_torch_kernel_detection_from_arch_list(cap, arch, ok):
    assert torch_has_kernels_for(cap, arch) is ok


def test_probe_output_round_trips_as_a_profile():
    report = build_hardware(AUTO, probe_machine)
    text = probe_yaml(report.profile.to_dict(), I5["chains"], I5["budgets"], report.notes)
    assert text.startswith("# ")
    parsed = profile_from_dict(yaml.safe_load(text))
    assert parsed.cpu == report.profile.cpu and parsed.ram_gb == report.profile.ram_gb
    assert parsed.chains == {k: tuple(v) for k, v in I5["chains"].items()}


def test_probe_output_is_usable_by_name_from_the_users_conf(tmp_path, monkeypatch):
    report = build_hardware(AUTO, probe_machine)
    (tmp_path / "conf" / "hardware").mkdir(parents=True)
    (tmp_path / "conf" / "hardware" / "my_machine.yaml").write_text(
        probe_yaml(report.profile.to_dict(), I5["chains"], I5["budgets"], []))
    monkeypatch.chdir(tmp_path)           # conf/ in the current folder is on the search path
    plan = make_container(load_config(["hardware=my_machine"])).core.resolver().plan()
    assert plan["memory"]["chosen"] == "cpu"


def test_auto_chains_come_from_the_probed_facts():
    avx2 = make_profile(isa=("sse4_2", "avx", "avx2", "fma"))
    bf16 = make_profile(isa=("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16"))
    assert derive_chains(avx2)["kernels"][-2:] == ("fp32_compute", "torch_native")      # bf16 slow: fp32 first
    assert derive_chains(bf16)["kernels"][-2:] == ("torch_native", "fp32_compute")      # native bf16 first
    for hw in (avx2, bf16):
        assert derive_chains(hw)["kernels"].index("int8_weight_only") < derive_chains(hw)["kernels"].index(
            "fp32_compute")
        # fewest bytes first: the native int4 GEMV decodes faster than int8 on AVX2 as on AVX-512
        assert derive_chains(hw)["kernels"][:3] == ("int4_weight_only", "int8_dynamic", "int8_weight_only")
        assert derive_chains(hw)["attention"][:2] == ("native", "sdpa")
    assert derive_chains(make_profile(gpu=PASCAL))["attention"][0] == "sdpa_mem_efficient"
    container = make_container(load_config(["hardware=auto"]))
    container.core.prober.override(lambda path, measure: (avx2, []))
    assert container.core.hardware_report().profile.chains == derive_chains(avx2)


def test_i5_profile_without_cuda_uses_the_cpu_order_and_says_so():
    container = make_container(load_config(["hardware=i5_sm61_nvme", "opt=moderate"]))
    container.core.prober.override(lambda path, measure: (make_profile(name="probed"), []))
    report = container.core.hardware_report()
    assert report.profile.gpu is None
    assert any("no CUDA GPU" in d for d in report.differences)
    assert report.profile.chains == cpu_chains(report.profile)
    plan = container.core.plan().to_dict()
    assert plan["slots"]["memory"]["chosen"] == "cpu"
    # the profile lists [sdpa_mem_efficient, chunked, sdpa, eager] for its GPU; on the CPU sdpa is fastest
    assert plan["slots"]["attention"]["chosen"] == "native"
    text = render_plan(plan)
    assert "no CUDA GPU usable by torch" in text and "give way to this CPU's" in text


def test_i5_profile_on_a_pascal_box_keeps_the_gpu():
    real = make_profile(name="probed", gpu=PASCAL)
    target = profile_from_dict(profile_dict())
    effective, _ = reconcile(target, real, emulate=False)
    assert effective.gpu == PASCAL and effective.chains == target.chains


def test_emulation_caps_to_the_profile():
    real = make_profile(name="probed", isa=("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16"),
                        ram_gb=64.0)
    target = profile_from_dict(profile_dict())
    effective, diffs = reconcile(target, real, emulate=True)
    assert "avx512f" not in effective.cpu.isa and effective.ram_gb == 16.0
    assert effective.cpu.physical_cores == 4
    assert any("avx512f" in d for d in diffs)
    assert emulation_env(effective) == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    plain_effective, _ = reconcile(target, real, emulate=False)
    assert "avx512f" in plain_effective.cpu.isa and plain_effective.ram_gb == 64.0


def test_threads_are_one_per_physical_core_unless_set_and_the_plan_says_so():
    four = make_profile(name="probed")                      # 4 physical cores, 8 threads
    default = thread_plan(four, None, pin=False)
    assert (default.compute, default.interop, default.pinned) == (4, 1, False)
    assert "physical core" in default.why
    assert thread_plan(four, 2, pin=True).compute == 2 and "4 physical cores" in thread_plan(four, 2, False).why
    assert thread_plan(four, None, False, omp_threads="1").compute == 1         # the user's OMP_NUM_THREADS
    assert "OMP_NUM_THREADS" in thread_plan(four, None, False, omp_threads="1").why
    assert thread_plan(four, None, False, omp_threads="lots").compute == 4      # not a count: ignored
    assert thread_plan(four, 3, False, omp_threads="1").compute == 3            # hardware.threads wins
    capped = thread_plan(four, None, False, omp_threads="16", emulate=True)     # emulation caps to the profile
    assert capped.compute == 4 and "capped" in capped.why
    assert thread_plan(four, 8, False, emulate=True).compute == 4
    container = make_container(load_config(["hardware=i5_sm61_nvme", "hardware.threads=3"]))
    container.core.prober.override(lambda path, measure: (four, []))
    report = container.core.hardware_report()
    assert report.threads.compute == 3
    text = render_plan(container.core.plan().to_dict())
    assert "  threads: 3 compute (hardware.threads; the CPU has 4 physical cores), 1 inter-op; not bound" in text
    with pytest.raises(ConfigError, match=r"hardware\.threads"):
        load_config(["hardware.threads=0"])


def test_pinned_threads_and_emulation_need_the_environment_before_torch_starts():
    target = profile_from_dict(profile_dict())
    assert process_env(target, emulate=False, threads=thread_plan(target, None, pin=False)) == {}
    assert process_env(target, emulate=False, threads=thread_plan(target, None, pin=True)) == PIN_ENV
    both = process_env(target, emulate=True, threads=thread_plan(target, None, pin=True))
    assert both == {**emulation_env(target), **PIN_ENV}


def test_apply_threads_sets_torchs_compute_threads():
    import torch

    before = torch.get_num_threads()
    try:
        apply_threads(thread_plan(make_profile(), 1, pin=False))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
