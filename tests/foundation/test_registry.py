"""Registry: lazy imports, entry points, and clear errors for unknown or broken plugins."""

from __future__ import annotations

import sys

import pytest

from qvl_pipeline.errors import PluginError
from qvl_pipeline.registry import BUILTIN, SLOT_NAMES, Discovered, PluginRegistry
from qvl_pipeline.slots import SLOTS, AttentionBackend


def test_slot_names_are_the_interfaces():
    assert tuple(SLOTS) == SLOT_NAMES


def test_builtin_plugins_import_lazily():
    sys.modules.pop("qvl_plugins.attention.sdpa", None)
    reg = PluginRegistry(discover=None)
    assert "qvl_plugins.attention.sdpa" not in sys.modules
    spec = reg.load("attention", "sdpa")
    assert "qvl_plugins.attention.sdpa" in sys.modules
    assert issubclass(spec.cls, AttentionBackend) and spec.name == "sdpa"


def test_every_builtin_loads_matches_its_slot_and_declares_fidelity_and_summary():
    reg = PluginRegistry(discover=None)
    for slot, names in BUILTIN.items():
        for name in names:
            spec = reg.load(slot, name)
            assert issubclass(spec.cls, SLOTS[slot]) and spec.name == name and spec.cls.summary
            assert "fidelity" in {k for c in spec.cls.__mro__ for k in vars(c)}
            assert spec.origin.endswith("(built-in)")


def test_one_class_under_two_names_is_not_subclassed():
    reg = PluginRegistry(builtin={}, discover=None)
    from qvl_plugins.attention.eager import EagerAttention

    reg.register("attention", "a", EagerAttention)
    reg.register("attention", "b", EagerAttention)
    assert reg.load("attention", "a").cls is reg.load("attention", "b").cls is EagerAttention


def discovered(*items):
    return lambda: [Discovered(*item, "thirdparty-pkg 1.2") for item in items]


def test_entry_point_plugins_are_selectable_like_builtins_and_name_their_package():
    eager = "qvl_plugins.attention.eager:EagerAttention"
    reg = PluginRegistry(discover=discovered(("attention", "third_party", eager)))
    assert "third_party" in reg.names("attention")
    assert reg.load("attention", "third_party").name == "third_party"
    assert reg.origin("attention", "third_party") == "thirdparty-pkg 1.2"


def test_entry_point_cannot_shadow_a_builtin_name_a_missing_slot_or_be_called_auto():
    reg = PluginRegistry(discover=discovered(("attention", "eager", "x.y:Z"), ("teleport", "a", "x:Y"),
                                             ("rotary", "auto", "x:Y")))
    assert reg.origin("attention", "eager").endswith("(built-in)")
    assert any("eager" in p and "taken" in p for p in reg.problems)
    assert any("teleport.a" in p and "names no slot" in p for p in reg.problems)
    assert any("rotary.auto" in p and "'auto'" in p for p in reg.problems)


def test_unknown_plugin_names_the_available_ones():
    with pytest.raises(PluginError) as err:
        PluginRegistry(discover=None).load("rotary", "nope")
    assert "reference" in str(err.value)


def test_broken_import_wrong_class_and_missing_fidelity_are_reported():
    reg = PluginRegistry(builtin={}, discover=None)
    reg.register("attention", "ghost", "qvl_plugins.attention.ghost:Ghost")
    reg.register("attention", "raises", "tests.foundation.fake_import_error:Anything")
    reg.register("attention", "wrong", "tests.foundation.fakes:NotAPlugin")
    reg.register("attention", "nofid", "tests.foundation.fakes:NoFidelity")
    with pytest.raises(PluginError, match="could not be imported"):
        reg.load("attention", "ghost")
    with pytest.raises(PluginError, match=r"RuntimeError: libfancy\.so"):
        reg.load("attention", "raises")
    with pytest.raises(PluginError, match="not a subclass of AttentionBackend"):
        reg.load("attention", "wrong")
    with pytest.raises(PluginError, match="declares no fidelity"):
        reg.load("attention", "nofid")


def test_unknown_slot_is_rejected():
    with pytest.raises(PluginError, match="unknown slot"):
        PluginRegistry(builtin={}, discover=None).register("teleport", "x", "a:B")
