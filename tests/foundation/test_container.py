"""Container wiring: config enters once, stages share the resolved plugins, tests swap parts by override."""

from __future__ import annotations

from qvl_pipeline.config.load import compose_config, to_plain
from qvl_pipeline.container import make_container
from qvl_pipeline.registry import PluginRegistry
from tests.conftest import make_profile
from tests.foundation.fakes import FAKES


def test_stages_share_the_resolved_singletons():
    container = make_container(to_plain(compose_config(["opt=minimal"])))
    vision_attention = container.vision.attention()
    assert vision_attention is container.decoder.attention() is container.core.attention()
    assert vision_attention.name == "eager"
    assert container.decoder.kv_cache().name == "static"


def test_override_hardware_and_registry():
    container = make_container(to_plain(compose_config(["opt=moderate"])))
    registry = PluginRegistry(discover=None)
    registry.register("attention", "good", FAKES["good"])
    container.core.registry.override(registry)
    container.core.prober.override(lambda path, measure: (make_profile(name="probed"), []))
    container.core.hardware_report.reset()
    hw = container.core.hardware()
    assert hw.cpu.model == "test cpu"
    container.config.attention.choice.from_value("good")
    assert container.decoder.attention().name == "good"
