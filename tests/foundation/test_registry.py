"""Registry: lazy imports, entry points, and clear errors for unknown or broken plugins."""

from __future__ import annotations

import sys

import pytest

from qvl_pipeline.errors import PluginError
from qvl_pipeline.registry import BUILTIN, PluginRegistry
from qvl_pipeline.slots import SLOTS, AttentionBackend


def test_builtin_plugins_import_lazily():
    sys.modules.pop("qvl_plugins.attention.sdpa", None)
    reg = PluginRegistry(discover=None)
    assert "qvl_plugins.attention.sdpa" not in sys.modules
    cls = reg.load("attention", "sdpa")
    assert "qvl_plugins.attention.sdpa" in sys.modules
    assert issubclass(cls, AttentionBackend) and cls.name == "sdpa"


def test_every_builtin_loads_and_matches_its_slot():
    reg = PluginRegistry(discover=None)
    for slot, names in BUILTIN.items():
        for name in names:
            cls = reg.load(slot, name)
            assert issubclass(cls, SLOTS[slot]) and cls.name == name and cls.summary


def test_entry_point_plugins_are_selectable_like_builtins():
    reg = PluginRegistry(discover=lambda: {"attention": {"third_party": "qvl_plugins.attention.eager:EagerAttention"}})
    assert "third_party" in reg.names("attention")
    assert reg.load("attention", "third_party").name == "third_party"
    assert reg.origin[("attention", "third_party")].startswith("entry point")


def test_entry_point_cannot_shadow_a_builtin_or_name_a_missing_slot():
    reg = PluginRegistry(discover=lambda: {"attention": {"eager": "x.y:Z"}, "teleport": {"a": "x:Y"}})
    assert reg.origin[("attention", "eager")] == "built-in"
    assert any("eager" in p and "taken" in p for p in reg.problems)
    assert any("teleport.a" in p and "names no slot" in p for p in reg.problems)


def test_unknown_plugin_names_the_available_ones():
    with pytest.raises(PluginError) as err:
        PluginRegistry(discover=None).load("rotary", "nope")
    assert "reference" in str(err.value)


def test_broken_import_and_wrong_class_are_reported():
    reg = PluginRegistry(builtin={}, discover=None)
    reg.register("attention", "ghost", "qvl_plugins.attention.ghost:Ghost")
    reg.register("attention", "wrong", "tests.foundation.fakes:NotAPlugin")
    with pytest.raises(PluginError, match="could not be imported"):
        reg.load("attention", "ghost")
    with pytest.raises(PluginError, match="not a subclass of AttentionBackend"):
        reg.load("attention", "wrong")


def test_unknown_slot_is_rejected():
    with pytest.raises(PluginError, match="unknown slot"):
        PluginRegistry(builtin={}, discover=None).register("teleport", "x", "a:B")
