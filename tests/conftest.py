"""Shared fixtures: hermetic run/caches dirs, hardware profiles built by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from qvl_pipeline.facts import RunFacts
from qvl_pipeline.hardware.probe import read_cpuinfo
from qvl_pipeline.hardware.profile import CpuFacts, GpuFacts, HardwareProfile, StorageFacts


def cpu_flags() -> set[str]:
    """The ISA flags of the CPU running the tests, as the probe reads them (empty without /proc/cpuinfo): what a
    test needs before it runs a native build for an ISA."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(read_cpuinfo(text)[1])


@pytest.fixture(scope="session")
def _native_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("native")


@pytest.fixture(autouse=True)
def _hermetic_dirs(tmp_path, monkeypatch, _native_dir):
    monkeypatch.setenv("QVL_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QVL_NATIVE_DIR", str(_native_dir))      # one native build per session, not per test


def make_profile(name: str = "test", gpu: GpuFacts | None = None, chains: dict | None = None,
                 isa: tuple[str, ...] = ("sse4_2", "avx", "avx2", "fma"), ram_gb: float = 16.0) -> HardwareProfile:
    return HardwareProfile(name=name, cpu=CpuFacts(model="test cpu", physical_cores=4, threads=8, isa=isa),
                           ram_gb=ram_gb, storage=StorageFacts(kind="nvme"), gpu=gpu,
                           chains={k: tuple(v) for k, v in (chains or {}).items()})


def make_facts(gpu: GpuFacts | None = None, hf_config: dict | None = None, stored_dtype: str = "float32",
               **profile: object) -> RunFacts:
    """RunFacts for plugin tests: a hand-built machine (see make_profile) and a tiny model (or `hf_config`)."""
    return RunFacts.example(make_profile(gpu=gpu, **profile), hf_config, stored_dtype)  # type: ignore[arg-type]


PASCAL = GpuFacts(name="NVIDIA GeForce MX250", compute_capability=(6, 1), vram_gb=2.0, torch_has_kernels=True)
PASCAL_NO_KERNELS = GpuFacts(name="NVIDIA GeForce MX250", compute_capability=(6, 1), vram_gb=2.0,
                             torch_has_kernels=False)
AMPERE = GpuFacts(name="NVIDIA GeForce RTX 3060", compute_capability=(8, 6), vram_gb=12.0, torch_has_kernels=True)


def write_tiny_checkpoint(layers: int = 2, max_position_embeddings: int = 4096, seed: int = 1, **text: object):
    """A complete Hugging Face checkpoint folder (weights, config.json, tokenizer, processor configs) of the tiny
    demo architecture with `layers` decoder layers; returns its path."""
    import copy

    from qvl_pipeline.config.load import load_config
    from qvl_pipeline.model.config import ModelConfig
    from qvl_pipeline.model.qwen3_vl import skeleton
    from qvl_pipeline.runtime.demo import ensure_demo_checkpoint

    hf = copy.deepcopy(load_config([]).model.hf_config)
    hf["text_config"].update(num_hidden_layers=layers, max_position_embeddings=max_position_embeddings, **text)
    return ensure_demo_checkpoint(hf, seed, lambda cfg: skeleton(ModelConfig.from_hf_dict(cfg)))
