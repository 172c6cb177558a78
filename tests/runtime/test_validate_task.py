"""task=validate: a pass/fail table of the chosen plugins' self-tests and an end-to-end check; a broken plugin
fails it."""

from __future__ import annotations

import dataclasses

import pytest
from dependency_injector import providers

from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.tasks import validate
from tests.foundation.fakes import FAKES

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]


def test_default_choices_validate(capsys):
    config = load_config(["task=validate", "progress=false"])
    assert validate.run(config, make_container(config)) == 0
    out = capsys.readouterr().out
    assert ("kernels=int8_dynamic self-test vs torch_native" in out
            or "kernels=int8_weight_only self-test vs torch_native" in out)       # the latter without a compiler
    assert "6 passed, 0 failed" in out


def test_a_plugin_that_disagrees_with_its_reference_fails_validation(capsys):
    config = load_config(["task=validate", "progress=false", "opt=minimal"])
    container = make_container(config)
    facts = container.core.facts()
    container.core.attention.override(providers.Object(FAKES["wrong_values"](facts, name="wrong_values")))
    assert validate.run(config, container) != 0
    out = capsys.readouterr().out
    assert "attention=wrong_values self-test vs eager" in out and "FAIL" in out


def test_end_to_end_passes_an_exact_choice():
    config = load_config(["task=validate", "progress=false", "opt=minimal"])
    bad = dataclasses.replace(config, attention=dataclasses.replace(config.attention, choice="sdpa"))
    assert validate.end_to_end(bad).passed                      # exact: passes
