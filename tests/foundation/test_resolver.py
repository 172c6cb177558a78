"""Selection semantics: explicit choices, chains, fidelity ceilings, self-tests, typed options, runtime fallback."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest

from qvl_pipeline.config.schema import SlotConfig
from qvl_pipeline.errors import ConfigError, PluginError
from qvl_pipeline.registry import SLOT_NAMES, PluginRegistry
from qvl_pipeline.resolver import Resolver
from tests.conftest import PASCAL, make_facts
from tests.foundation.fakes import FAKES, attention_inputs


def registry() -> PluginRegistry:
    reg = PluginRegistry(builtin={}, discover=None)
    for name, cls in FAKES.items():
        reg.register("attention", name, cls)
    reg.register("attention", "chunked", "qvl_plugins.attention.chunked:ChunkedAttention")
    return reg


def opt(fidelity="near", self_test=True):
    return SimpleNamespace(level="test", max_fidelity=fidelity, self_test=self_test)


def slots(choice=None, options=None):
    return {slot: SlotConfig(choice=choice if slot == "attention" else None,
                             options=(options or {}) if slot == "attention" else {}) for slot in SLOT_NAMES}


def resolver(chain, choice=None, gpu=None, fidelity="near", self_test=True, options=None) -> Resolver:
    facts = make_facts(gpu=gpu, chains={"attention": chain})
    return Resolver(registry(), facts, opt(fidelity, self_test), slots(choice, options))


def test_chain_takes_first_usable_and_records_every_rejection():
    r = resolver(["needs_gpu", "fails_self_test", "approximate", "broken_validate", "missing", "no_fidelity",
                  "wrong_layout", "wrong_values", "good", "eager"])
    plugin = r.resolve("attention")
    assert plugin.name == "good"
    rejected = {x.plugin: " ".join(x.reasons) for x in r.decisions["attention"].rejected}
    assert rejected["needs_gpu"] == "fake needs a GPU"
    assert "self-test failed" in rejected["fails_self_test"] and "0.5" in rejected["fails_self_test"]
    assert "beyond opt=test" in rejected["approximate"]
    assert "validate raised KeyError" in rejected["broken_validate"]
    assert "not installed" in rejected["missing"]
    assert "declares no fidelity" in rejected["no_fidelity"]
    # The default self-test (the slot's public checker against the reference plugin) catches both.
    assert "self-test failed" in rejected["wrong_layout"] and "shape" in rejected["wrong_layout"]
    assert "self-test failed" in rejected["wrong_values"] and "relative error" in rejected["wrong_values"]
    assert list(rejected) == ["needs_gpu", "fails_self_test", "approximate", "broken_validate", "missing",
                              "no_fidelity", "wrong_layout", "wrong_values"]


def test_chain_uses_gpu_entry_when_facts_have_a_gpu():
    assert resolver(["needs_gpu", "eager"], gpu=PASCAL).resolve("attention").name == "needs_gpu"


def test_resolution_is_cached_per_run():
    r = resolver(["good"])
    assert r.resolve("attention") is r.resolve("attention")


def test_self_test_skipped_when_opt_disables_it():
    assert resolver(["fails_self_test", "eager"], self_test=False).resolve("attention").name == "fails_self_test"


def test_approximate_admitted_at_aggressive():
    assert resolver(["approximate", "eager"], fidelity="approximate").resolve("attention").name == "approximate"


def test_minimal_admits_only_reference():
    r = resolver(["good", "eager"], fidelity="reference")
    assert r.resolve("attention").name == "eager"


def test_validate_sees_the_models_facts():
    r = resolver(["needs_gpu", "eager"])
    assert r.facts.model.config.text.num_hidden_layers == 2       # the tiny example model, not a preset


def test_options_are_per_plugin_typed_and_reach_only_their_plugin():
    r = resolver(["chunked", "eager"], options={"chunked": {"chunk_size": 3}})
    plugin = r.resolve("attention")
    assert plugin.name == "chunked" and plugin.options.chunk_size == 3
    assert r.decisions["attention"].options == {"chunk_size": 3}
    # the same options are unknown to eager: a chain that picks eager never sees them
    assert resolver(["eager"], options={"chunked": {"chunk_size": 3}}).resolve("attention").options.__class__.__name__ \
        == "NoOptions"


@pytest.mark.parametrize(("options", "message"), [
    ({"chunked": {"chunk_sise": 3}}, r"attention\.options\.chunked: unknown option\(s\) \['chunk_sise'\]"),
    ({"chunked": {"chunk_size": "big"}}, r"attention\.options\.chunked\.chunk_size: expected an integer"),
    ({"chunked": {"chunk_size": 0}}, r"attention\.options\.chunked: chunk_size must be a positive"),
    ({"chunkd": {"chunk_size": 3}}, r"attention\.options\.chunkd: there is no attention plugin named 'chunkd'"),
])
def test_bad_options_are_config_errors_naming_the_key(options, message):
    with pytest.raises(ConfigError, match=message):
        resolver(["chunked", "eager"], options=options).resolve("attention")


def test_explicit_invalid_fails_with_reasons():
    with pytest.raises(PluginError) as err:
        resolver(["eager"], choice="needs_gpu").resolve("attention")
    assert "attention=needs_gpu cannot run" in str(err.value) and "fake needs a GPU" in str(err.value)


def test_explicit_failing_self_test_fails_loudly():
    with pytest.raises(PluginError, match="failed its self-test"):
        resolver(["eager"], choice="fails_self_test").resolve("attention")


def test_explicit_wrong_layout_fails_loudly():
    with pytest.raises(PluginError, match=r"failed its self-test.*shape"):
        resolver(["eager"], choice="wrong_layout").resolve("attention")


def test_explicit_unknown_names_available():
    with pytest.raises(PluginError) as err:
        resolver(["eager"], choice="flash9000").resolve("attention")
    assert "unknown attention plugin 'flash9000'" in str(err.value)
    assert "eager" in str(err.value) and "good" in str(err.value)


def test_explicit_beyond_opt_is_admitted_and_noted():
    r = resolver(["eager"], choice="approximate", fidelity="reference")
    assert r.resolve("attention").name == "approximate"
    assert "beyond opt=test" in r.decisions["attention"].summary


def test_exhausted_chain_names_every_reason():
    with pytest.raises(PluginError) as err:
        resolver(["needs_gpu", "fails_self_test", "missing"]).resolve("attention")
    text = str(err.value)
    assert "no usable attention plugin" in text
    for part in ("needs_gpu: fake needs a GPU", "fails_self_test: self-test failed", "missing: not installed"):
        assert part in text


def test_runtime_fallback_moves_along_chain():
    r = resolver(["crashes_at_run", "good", "eager"])
    first = r.resolve("attention")
    with pytest.raises(RuntimeError) as err:
        first.attend(*attention_inputs(), causal=True, scale=0.3)
    second = r.fallback("attention", err.value)
    assert second.name == "good" and r.resolve("attention") is second
    runtime = [x for x in r.decisions["attention"].rejected if x.stage == "runtime"]
    assert runtime[0].plugin == "crashes_at_run" and "no kernel image" in runtime[0].reasons[0]
    assert r.fallback("attention", RuntimeError("again")).name == "eager"
    with pytest.raises(PluginError, match="no usable attention plugin"):
        r.fallback("attention", RuntimeError("and again"))


def test_runtime_failure_of_explicit_choice_is_an_error():
    r = resolver(["eager"], choice="crashes_at_run")
    r.resolve("attention")
    with pytest.raises(PluginError, match="chosen explicitly and failed while running"):
        r.fallback("attention", RuntimeError("CUDA out of memory"))


def test_missing_chain_is_an_error_naming_the_fix():
    facts = make_facts()
    r = Resolver(registry(), replace(facts, hardware=replace(facts.hardware, chains={})), opt(), slots())
    with pytest.raises(PluginError, match="declares no chain for slot 'attention'"):
        r.resolve("attention")


def test_bad_fidelity_level_is_named():
    with pytest.raises(ConfigError, match=r"opt\.max_fidelity='bogus'"):
        Resolver(registry(), make_facts(), opt("bogus"), slots())
