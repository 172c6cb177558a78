"""Every option of every config group composes, and its plugins resolve on this (GPU-less) machine."""

from __future__ import annotations

from pathlib import Path

import pytest

import qvl_pipeline
from qvl_pipeline.config.load import compose_config, to_plain
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError, PluginError
from qvl_pipeline.slots import SLOTS

CONF = Path(qvl_pipeline.__file__).parent / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("tuning", "__pycache__"))
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
PROFILES = sorted(f.stem for f in (CONF / "hardware").glob("*.yaml"))
OPT_LEVELS = sorted(f.stem for f in (CONF / "opt").glob("*.yaml"))


def test_every_option_file_starts_with_a_comment():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#"), f"{path} must start with a one-line comment"


@pytest.mark.parametrize(("group", "option"), OPTIONS)
def test_every_option_composes_and_resolves_or_explains(group, option):
    plain = to_plain(compose_config([f"{group}={option}"]))
    container = make_container(plain)
    resolver = container.core.resolver()
    if group in SLOTS and option != "auto":
        # An explicit plugin either resolves or fails with the reasons it cannot run here.
        try:
            assert resolver.resolve(group).name == option
        except PluginError as exc:
            assert "cannot run on this machine" in str(exc) and option in str(exc)
            assert group in ("attention", "memory")   # only CUDA-only plugins may refuse on this machine
        return
    assert set(resolver.resolve_all()) == set(SLOTS)


@pytest.mark.parametrize("opt", OPT_LEVELS)
@pytest.mark.parametrize("hardware", PROFILES)
def test_every_profile_and_opt_level_resolves(hardware, opt):
    plain = to_plain(compose_config([f"hardware={hardware}", f"opt={opt}"]))
    plan = make_container(plain).core.resolver().plan()
    for slot, decision in plan.items():
        assert decision["chosen"], slot
        if opt == "minimal":
            assert decision["fidelity"] == "reference", (slot, decision)


def test_tuning_file_applies_for_its_combination():
    plain = to_plain(compose_config(["hardware=i5_sm61_nvme", "opt=aggressive"]))
    assert plain["hardware"]["budgets"]["max_pixels"] == 200704
    plain = to_plain(compose_config(["hardware=i5_sm61_nvme", "opt=minimal"]))
    assert plain["hardware"]["budgets"]["max_pixels"] == 401408


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
