"""Every option of every config group composes, and its plugins resolve on this (GPU-less) machine."""

from __future__ import annotations

from pathlib import Path

import pytest

import qvl_pipeline
from qvl_pipeline.config.load import compose_config, load_config
from qvl_pipeline.config.schema import GenerateConfig, RootConfig
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError, PluginError
from qvl_pipeline.registry import SLOT_NAMES, PluginRegistry
from qvl_pipeline.slots import SLOTS

CONF = Path(qvl_pipeline.__file__).parent / "conf"
FILE_GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("tuning", "__pycache__"))
REGISTRY = PluginRegistry(discover=None)
OPTIONS = [(g, f.stem) for g in FILE_GROUPS for f in sorted((CONF / g).glob("*.yaml"))] + \
    [(slot, name) for slot in SLOT_NAMES for name in ["auto", *REGISTRY.names(slot)]]
PROFILES = sorted(f.stem for f in (CONF / "hardware").glob("*.yaml"))
OPT_LEVELS = sorted(f.stem for f in (CONF / "opt").glob("*.yaml"))
CUDA_ONLY = {("attention", "sdpa_mem_efficient"), ("attention", "sdpa_flash"), ("memory", "cuda_full"),
             ("memory", "cuda_partial"), ("memory", "cuda_offload_stream")}


def test_every_option_file_starts_with_a_comment():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must start with a one-line comment"


def test_slot_groups_are_the_registry():
    assert not any((CONF / slot).exists() for slot in SLOT_NAMES)    # no YAML copies of the registry
    assert {name for slot, name in OPTIONS if slot == "kernels"} == {"auto", *REGISTRY.names("kernels")}


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_resolves_or_explains(group, option):
    config = load_config([f"{group}={option}"])
    resolver = make_container(config).core.resolver()
    if group in SLOT_NAMES and option != "auto":
        # An explicit plugin either resolves or fails with the reasons it cannot run here.
        try:
            assert resolver.resolve(group).name == option
        except PluginError as exc:
            assert "cannot run here" in str(exc) and option in str(exc)
            assert (group, option) in CUDA_ONLY     # only CUDA-only plugins may refuse on this machine
        return
    assert set(resolver.resolve_all()) == set(SLOTS)


@pytest.mark.parametrize("opt", OPT_LEVELS)
@pytest.mark.parametrize("hardware", PROFILES)
def test_every_profile_and_opt_level_resolves(hardware, opt):
    plan = make_container(load_config([f"hardware={hardware}", f"opt={opt}"])).core.resolver().plan()
    for slot, decision in plan.items():
        assert decision["chosen"], slot
        if opt == "minimal":
            assert decision["fidelity"] == "reference", (slot, decision)


def test_tuning_file_applies_for_its_combination():
    assert load_config(["hardware=i5_sm61_nvme", "opt=aggressive"]).hardware.budgets["max_pixels"] == 200704
    assert load_config(["hardware=i5_sm61_nvme", "opt=minimal"]).hardware.budgets["max_pixels"] == 401408


def test_config_stays_typed():
    config = load_config(["attention.options.chunked.chunk_size=512"])
    assert isinstance(config, RootConfig) and isinstance(config.generate, GenerateConfig)
    assert config.attention.options == {"chunked": {"chunk_size": 512}}   # no '+' needed for plugin options


def test_plugin_option_files_apply_when_the_chain_picks_the_plugin():
    container = make_container(load_config(["attention.options.chunked.chunk_size=7",
                                            "hardware.chains.attention=[chunked,eager]"]))
    assert container.core.attention().options.chunk_size == 7


def test_unknown_options_name_the_available_ones():
    for override, expected in (("hardware=laptop9000", "i5_sm61_nvme"), ("opt=turbo", "moderate"),
                               ("attention=flash9000", "eager")):
        with pytest.raises(ConfigError) as err:
            compose_config([override])
        assert expected in str(err.value), str(err.value)


def test_schema_catches_typos_and_wrong_types():
    with pytest.raises(ConfigError, match="levle"):
        compose_config(["opt.levle=fast"])
    with pytest.raises(ConfigError, match="emulate"):
        compose_config(["hardware.emulate=maybe"])
    with pytest.raises(ConfigError, match="max_new_tokens"):
        compose_config(["generate.max_new_tokens=lots"])
    with pytest.raises(ConfigError, match="promt"):
        compose_config(["promt=hello"])


def test_the_checkouts_conf_folder_holds_user_profiles_and_experiments(monkeypatch):
    monkeypatch.chdir(Path(qvl_pipeline.__file__).parents[1])
    config = load_config(["hardware=example_i7_avx2", "+experiment=long_context_chat"])
    assert config.hardware.name == "example_i7_avx2"
    assert config.kv_cache.choice == "int8" and config.attention.options["chunked"]["chunk_size"] == 512
