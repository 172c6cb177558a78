"""task=tune: it writes a loadable hardware profile whose chains are permutations of the running profile's (the
measured candidates re-ordered, the others in place), with a comment block citing the measurements and `tuned:`
notes that task=plan prints; it never overwrites a profile unless told to, and refuses bad config. Speed is never
asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qvl_pipeline.bench.slot_speed import NOISE_MARGIN, Measured, ordered_chain
from qvl_pipeline.config.load import PROFILE_NAME, load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import ConfigError
from qvl_pipeline.hardware.profile import profile_from_dict
from qvl_pipeline.plan import render_plan
from qvl_pipeline.tasks import tune

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

NAME = "tuned_test_box"
FAST = ("tune.min_time=0.005",)
MEASURED = ("kernels", "attention", "rotary")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tune of the tiny demo at opt=moderate: (the written profile's text, the running profile, results dir,
    the tuning results, the conf dir)."""
    conf = tmp_path_factory.mktemp("conf")
    cache = tmp_path_factory.mktemp("cache")
    results = tmp_path_factory.mktemp("results")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_CONF_DIR", str(conf))
        mp.setenv("QVL_CACHE_DIR", str(cache))
        config = load_config(["task=tune", f"tune.name={NAME}", *FAST])
        container = make_container(config)
        running = container.core.hardware_report().profile
        found = {}
        original = tune.tune_all
        mp.setattr(tune, "tune_all", lambda *a: found.setdefault("results", original(*a)))
        assert tune.run(config, container, results) == 0
    return (conf / "hardware" / f"{NAME}.yaml").read_text(), running, results, found["results"], conf


def test_the_profile_loads_and_its_chains_are_permutations_of_the_candidates(tuned):
    text, running, _, _, _ = tuned
    profile = profile_from_dict(yaml.safe_load(text))
    assert profile.name == NAME
    assert set(profile.chains) == set(running.chains)
    for slot, chain in profile.chains.items():
        assert sorted(chain) == sorted(running.chains[slot]), slot
    assert profile.cpu.memory_bandwidth_gb_s > 0          # measured when the running profile had none
    assert (profile.cpu.isa, profile.ram_gb, profile.budgets) == (running.cpu.isa, running.ram_gb, running.budgets)


def test_unmeasured_entries_keep_their_place(tuned):
    text, running, _, results, _ = tuned
    profile = profile_from_dict(yaml.safe_load(text))
    kernels = results["kernels"]
    assert "int4_weight_only" in kernels.unmeasured           # approximate: beyond opt=moderate
    assert "beyond opt=moderate" in kernels.unmeasured["int4_weight_only"]
    where = running.chains["kernels"].index("int4_weight_only")
    assert profile.chains["kernels"][where] == "int4_weight_only"
    for slot in ("memory", "kv_cache"):
        assert profile.chains[slot] == running.chains[slot]


def test_measured_candidates_are_ordered_by_their_score(tuned):
    text, running, _, results, _ = tuned
    profile = profile_from_dict(yaml.safe_load(text))
    for slot in MEASURED:
        measured = results[slot].measured
        assert len(measured) >= 2, slot                       # this CPU has at least two usable ones per slot
        scores = {m.plugin: m.score for m in measured}
        order = [name for name in profile.chains[slot] if name in scores]
        assert order == [n for n in ordered_chain(running.chains[slot], scores) if n in scores]
        # An entry ahead of another is never slower by more than the noise margin.
        for i, first in enumerate(order):
            for later in order[i + 1:]:
                assert scores[first] <= scores[later] * (1 + NOISE_MARGIN) or \
                    running.chains[slot].index(first) < running.chains[slot].index(later)
        assert all(m.score > 0 and m.decode_ms > 0 and m.prefill_ms > 0 for m in measured)


def test_the_comment_block_cites_each_measurement_and_the_date(tuned):
    text, _, _, results, _ = tuned
    comments = [line for line in text.splitlines() if line.startswith("#")]
    assert text.startswith("# Tuned hardware profile")
    block = "\n".join(comments)
    assert "GB/s" in block and " ms" in block and "RAM read bandwidth" in block
    for slot in MEASURED:
        for m in results[slot].measured:
            assert f"  {m.plugin}: decode " in block
    profile = yaml.safe_load(text)
    assert len(profile["tuned"]) == len(MEASURED)
    date = profile["tuned"][0].split("measured ")[1].split(",")[0]
    assert date[:2] == "20" and date in block


def test_the_plan_of_the_tuned_profile_cites_the_measurements(tuned, monkeypatch):
    text, _, _, _, conf = tuned
    monkeypatch.setenv("QVL_CONF_DIR", str(conf))
    config = load_config([f"hardware={NAME}", "task=plan"])
    plan = make_container(config).core.plan().to_dict()
    rendered = render_plan(plan)
    written = yaml.safe_load(text)
    for slot in MEASURED:
        assert f"  tuned: {slot}: " in rendered
        assert plan["slots"][slot]["candidates"] == written["chains"][slot]


def test_tune_json_is_written(tuned):
    import json

    _, _, results, _, _ = tuned
    summary = json.loads((results / "tune.json").read_text())
    assert summary["name"] == NAME and set(MEASURED) <= set(summary["slots"])
    assert summary["slots"]["kernels"]["measured"][0]["shapes"]


def test_an_existing_profile_is_never_overwritten_unless_asked(tuned, monkeypatch, tmp_path):
    text, _, _, results, conf = tuned
    monkeypatch.setenv("QVL_CONF_DIR", str(conf))
    monkeypatch.setattr(tune, "tune_all", lambda *a: pytest.fail("measured before refusing"))
    config = load_config(["task=tune", f"tune.name={NAME}", *FAST])
    with pytest.raises(ConfigError) as caught:
        tune.run(config, make_container(config), tmp_path)
    assert "tune.overwrite=true" in str(caught.value) and "\n" not in caught.value.message
    assert (conf / "hardware" / f"{NAME}.yaml").read_text() == text
    monkeypatch.setattr(tune, "tune_all", lambda *a: results)
    config = load_config(["task=tune", f"tune.name={NAME}", "tune.overwrite=true", *FAST])
    assert tune.run(config, make_container(config), tmp_path) == 0
    assert profile_from_dict(yaml.safe_load((conf / "hardware" / f"{NAME}.yaml").read_text())).name == NAME
    assert not list((conf / "hardware").glob(".*.tmp"))


def test_the_profile_file_never_replaces_one_that_appears_meanwhile(tmp_path):
    path = tmp_path / "hardware" / "late.yaml"
    path.parent.mkdir()
    path.write_text("# someone else's\n")
    with pytest.raises(ConfigError, match="overwrite"):
        tune.write_profile(path, "name: late\n", overwrite=False)
    assert path.read_text() == "# someone else's\n"
    tune.write_profile(path, "name: late\n", overwrite=True)
    assert path.read_text() == "name: late\n"


@pytest.mark.parametrize(("override", "key"), [
    ("tune.name=bad-name", "tune.name"),
    ("tune.name=9lives", "tune.name"),
    ("tune.name=cpu_avx2", "tune.name"),
    ("tune.min_time=0", "tune.min_time"),
    ("tune.min_time=1000", "tune.min_time"),
])
def test_bad_tune_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(["task=tune", override])
    assert key in caught.value.message and "\n" not in caught.value.message


def test_the_default_name_is_a_valid_profile_name():
    assert tune.default_name().startswith("tuned_") and PROFILE_NAME.match(tune.default_name())


def test_ordered_chain_sorts_measured_entries_into_their_places():
    chain = ("a", "b", "c", "d")
    assert ordered_chain(chain, {"a": 3.0, "c": 1.0, "d": 2.0}) == ("c", "b", "d", "a")
    assert ordered_chain(chain, {}) == chain
    assert ordered_chain(chain, {"b": 1.0}) == chain
    # Within the noise margin the profile's order stands; beyond it the faster one goes first.
    assert ordered_chain(chain, {"a": 1.05, "b": 1.0}) == chain
    assert ordered_chain(chain, {"a": 1.05, "b": 1.0}, margin=0.0) == ("b", "a", "c", "d")
    assert ordered_chain(chain, {"a": 1.5, "b": 1.0}) == ("b", "a", "c", "d")


def test_a_candidate_that_fails_while_measured_keeps_its_place():
    config = load_config(["task=tune", *FAST])
    resolver = make_container(config).core.resolver()

    def measure(plugin):
        if plugin.name == "sdpa":
            raise RuntimeError("kernel exploded")
        return Measured(plugin.name, {"native": 3.0, "chunked": 2.0, "eager": 1.0}[plugin.name], 1.0, 1.0)

    result = tune.tune_slot("attention", resolver, measure, self_test=False)
    assert "kernel exploded" in result.unmeasured["sdpa"]
    assert result.tuned == ("eager", "sdpa", "chunked", "native")      # sdpa keeps its place; the rest by time


@pytest.mark.slow
def test_cli_tune_then_plan_from_the_current_folder(tmp_path):
    root = str(Path(__file__).resolve().parents[2])        # this checkout, also from another current folder
    env = {**os.environ, "QVL_CACHE_DIR": str(tmp_path / "cache"), "QVL_RUNS_DIR": str(tmp_path / "runs"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    env.pop("QVL_CONF_DIR", None)
    python = [sys.executable, "-m", "qvl_pipeline"]
    run = subprocess.run([*python, "task=tune", "tune.name=cli_box", *FAST], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "conf" / "hardware" / "cli_box.yaml").is_file()
    assert "tune: kernels: measuring" in run.stderr and "written:" in run.stdout
    plan = subprocess.run([*python, "task=plan", "hardware=cli_box"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr
    assert "== plan: hardware=cli_box" in plan.stdout and "  tuned: kernels: " in plan.stdout
    again = subprocess.run([*python, "task=tune", "tune.name=cli_box", *FAST], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "tune.overwrite=true" in again.stderr
    assert "Traceback" not in again.stderr
