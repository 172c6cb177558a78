"""Hostile input at the config layer: user text is data (never interpolated, never parsed by Hydra's grammar), every
range rule of the typed config and of hardware profiles refuses bad values with the key and the allowed range."""

from __future__ import annotations

import math

import pytest

from qvl_pipeline.config.load import load_config
from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.profile import ProfileError, profile_from_dict

TRICKY = [
    "${oc.env:HOME}",
    "${x}",
    "What's in it, and why?",
    "#1 = ~best, [really] {ok}",
    "line one\nline two\ttab",
    "back\\slash \\${not} \\\\${x} end\\",
    "'quoted' \"double\" \\'",
    "",
]


@pytest.mark.parametrize("text", TRICKY)
def test_prompt_is_taken_literally(text):
    assert load_config([f"prompt={text}"]).prompt == text


def test_every_user_text_key_is_literal_and_null_still_unsets():
    config = load_config(["image=${oc.env:HOME}/a, b.png", "model.path=/m/${x}", "results_dir=out,1",
                          "prompt_file=p #1.txt"])
    assert config.image == "${oc.env:HOME}/a, b.png" and config.model.path == "/m/${x}"
    assert config.results_dir == "out,1" and config.prompt_file == "p #1.txt"
    assert load_config(["image=null"]).image is None


def test_image_lists_take_quoted_elements_and_a_single_path():
    config = load_config(["images=[a.png, 'b,c.png', \"${HOME}.png\"]", "video=one.png"])
    assert config.images == ["a.png", "b,c.png", "${HOME}.png"]
    assert config.video == ["one.png"]
    assert load_config(["images=[]"]).images == []


def test_literal_round_trips_through_hydra_and_omegaconf():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from qvl_pipeline.config.load import literal

    parser = OverridesParser.create()
    for text in TRICKY:
        value = parser.parse_override(f"prompt={literal(text)}").value()
        assert OmegaConf.create({"p": value}).p == text


def test_other_overrides_are_untouched():
    from qvl_pipeline.config.load import literal_user_text

    assert literal_user_text(["task=chat", "generate.seed=3", "hardware.chains.attention=[eager]"]) == [
        "task=chat", "generate.seed=3", "hardware.chains.attention=[eager]"]


@pytest.mark.parametrize("override", ["generate.top_p=a,b", "attention.options.chunked.note=a b'c"])
def test_an_override_hydra_cannot_read_says_how_to_quote(override):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert override in err.value.message and "in a shell" in err.value.hint


@pytest.mark.parametrize(("override", "key"), [
    ("processing.max_pixels=-5", "processing.max_pixels"),
    ("processing.max_pixels=0", "processing.max_pixels"),
    ("processing.min_pixels=-1", "processing.min_pixels"),
    ("processing.max_image_pixels=0", "processing.max_image_pixels"),
    ("hardware.budgets.max_pixels=-3", "hardware.budgets.max_pixels"),
    ("hardware.budgets.max_context=0", "hardware.budgets.max_context"),
    ("+hardware.budgets.max_pixel=5", "hardware.budgets.max_pixel"),
    ("generate.seed=99999999999999999999", "generate.seed"),
    ("generate.seed=-1", "generate.seed"),
    ("generate.max_context=0", "generate.max_context"),
    ("generate.max_context=-8", "generate.max_context"),
    ("generate.max_new_tokens=0", "generate.max_new_tokens"),
    ("generate.temperature=-0.5", "generate.temperature"),
    ("generate.temperature=inf", "generate.temperature"),
    ("generate.top_k=-1", "generate.top_k"),
    ("generate.top_p=0", "generate.top_p"),
    ("generate.min_p=1.5", "generate.min_p"),
    ("generate.min_p=-0.1", "generate.min_p"),
    ("generate.repetition_penalty=0", "generate.repetition_penalty"),
    ("generate.repetition_penalty=nan", "repetition_penalty"),
    ("features.max_cached_images=-1", "features.max_cached_images"),
    ("model.seed=-2", "model.seed"),
    ("output=xml", "output"),
    ("hardware.threads=0", "hardware.threads"),
])
def test_out_of_range_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config([override])
    assert key in err.value.message


def test_a_value_that_does_not_resolve_is_one_line_naming_its_key():
    with pytest.raises(ConfigError) as err:
        load_config(["opt.description=${oc.env:QVL_TEST_SURELY_UNSET}"])
    assert "opt.description" in err.value.message and "QVL_TEST_SURELY_UNSET" in err.value.message
    assert "\n" not in err.value.message


def test_min_pixels_above_max_pixels_is_refused():
    with pytest.raises(ConfigError, match=r"processing\.min_pixels"):
        load_config(["processing.min_pixels=5000", "processing.max_pixels=4000"])


def test_edge_values_are_accepted():
    config = load_config(["generate.min_p=0.99", "generate.seed=9223372036854775807", "processing.min_pixels=0",
                          "generate.max_context=1", "features.max_cached_images=0"])
    assert config.generate.seed == 2**63 - 1


def _profile(**changes):
    data = {"name": "p", "cpu": {"model": "x", "physical_cores": 4, "threads": 8}, "ram_gb": 16,
            "storage": {"kind": "nvme"}, "gpu": {"name": "g", "compute_capability": [6, 1], "vram_gb": 2.0}}
    for path, value in changes.items():
        node = data
        *parents, leaf = path.split("__")
        for part in parents:
            node = node[part]
        node[leaf] = value
    return data


@pytest.mark.parametrize(("changes", "field"), [
    ({"cpu__physical_cores": -4}, "hardware.cpu.physical_cores"),
    ({"cpu__physical_cores": 0}, "hardware.cpu.physical_cores"),
    ({"cpu__threads": 0}, "hardware.cpu.threads"),
    ({"cpu__threads": 2}, "hardware.cpu.threads"),                  # fewer threads than cores
    ({"cpu__l3_kb": -1}, "hardware.cpu.l3_kb"),
    ({"ram_gb": 0}, "hardware.ram_gb"),
    ({"ram_gb": -8}, "hardware.ram_gb"),
    ({"ram_gb": math.nan}, "hardware.ram_gb"),
    ({"gpu__vram_gb": 0}, "hardware.gpu.vram_gb"),
    ({"gpu__compute_capability": [0, 0]}, "hardware.gpu.compute_capability"),
    ({"storage__read_mb_s": -1.0}, "hardware.storage.read_mb_s"),
    ({"storage__kind": "floppy"}, "hardware.storage.kind"),
    ({"budgets": {"max_pixels": -1}}, "hardware.budgets.max_pixels"),
    ({"budgets": {"max_pixel": 100}}, "hardware.budgets.max_pixel"),
])
def test_profiles_with_impossible_facts_are_refused(changes, field):
    with pytest.raises(ProfileError) as err:
        profile_from_dict(_profile(**changes))
    assert field in str(err.value)


def test_every_packaged_profile_still_validates():
    from pathlib import Path

    import yaml

    folder = Path(__file__).resolve().parents[2] / "qvl_pipeline" / "conf" / "hardware"
    for path in sorted(folder.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("probe"):
            continue
        profile_from_dict({k: v for k, v in data.items() if k not in ("probe", "emulate", "measure")})
