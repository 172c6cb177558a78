"""The command line as a user runs it: exit codes, messages that name the fix, stdout kept clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from qvl_pipeline.hardware.profile import profile_from_dict

pytestmark = pytest.mark.slow


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvl_pipeline", *args], capture_output=True, text=True,
                          timeout=180, env={**os.environ, **(env or {})})


def test_plan_for_the_reference_laptop():
    run = cli("task=plan", "hardware=i5_sm61_nvme", "opt=moderate")
    assert run.returncode == 0, run.stderr
    assert "== plan: hardware=i5_sm61_nvme opt=moderate" in run.stdout
    for slot in ("attention", "rotary", "kernels", "memory", "kv_cache"):
        assert f"  {slot}" in run.stdout
    assert "weights by format" in run.stdout


def test_plan_as_json_is_the_only_stdout(tmp_path):
    run = cli("task=plan", "output=json", f"results_dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    assert set(plan["slots"]) == {"attention", "rotary", "kernels", "memory", "kv_cache"}
    assert json.loads((tmp_path / "plan.json").read_text()) == plan


def test_probe_prints_a_valid_profile():
    run = cli("task=probe")
    assert run.returncode == 0, run.stderr
    profile = profile_from_dict(yaml.safe_load(run.stdout))
    assert profile.cpu.threads >= 1 and set(profile.chains) == {"attention", "rotary", "kernels", "memory",
                                                                "kv_cache"}


@pytest.mark.parametrize(("args", "expected"), [
    (("attention=flash9000",), "eager"),
    (("hardware=laptop9000",), "i5_sm61_nvme"),
    (("opt=turbo",), "moderate"),
    (("task=plan", "attention=sdpa_flash"), "sdpa_flash cannot run"),
    (("task=plan", "memory=cuda_full"), "needs a CUDA GPU"),
    (("task=plan", "opt.levle=3"), "levle"),
    (("task=dance",), "task/dance"),
])
def test_bad_input_exits_nonzero_naming_the_fix(args, expected):
    run = cli(*args)
    assert run.returncode != 0
    assert expected in run.stderr, run.stderr


def test_help_lists_the_groups_and_cfg_job_works():
    run = cli("--help")
    assert run.returncode == 0
    for group in ("hardware", "opt", "model", "attention", "kv_cache", "task"):
        assert group in run.stdout
    run = cli("--cfg", "job", "hardware=cpu_avx2")
    assert run.returncode == 0 and "cpu_avx2" in run.stdout


def test_emulation_restarts_with_the_profile_isa():
    run = cli("task=plan", "hardware=i5_sm61_nvme", "hardware.emulate=true", "output=json")
    assert run.returncode == 0, run.stderr
    plan = json.loads(run.stdout)
    facts = plan["hardware"]["facts"]
    assert "avx512f" not in facts["cpu"]["isa"] and facts["cpu"]["physical_cores"] <= 4
    assert plan["hardware"]["emulate"] is True


def test_pinned_threads_restart_once_with_the_openmp_binding_and_the_plan_says_so():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_PLACES", "OMP_PROC_BIND")}
    run = subprocess.run([sys.executable, "-m", "qvl_pipeline", "task=plan", "hardware.pin_threads=true"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 0, run.stderr
    assert "binding threads to cores: restarting with OMP_PLACES=cores OMP_PROC_BIND=close" in run.stderr
    assert run.stderr.count("restarting") == 1
    assert "inter-op; bound one per physical core (OMP_PLACES=cores)" in run.stdout


def test_plan_for_a_checkpoint_folder_states_that_checkpoints_layers(tmp_path):
    from tests.conftest import write_tiny_checkpoint

    env = {"QVL_CACHE_DIR": str(tmp_path / "cache")}
    os.environ["QVL_CACHE_DIR"] = env["QVL_CACHE_DIR"]
    folder = write_tiny_checkpoint(layers=3)
    run = cli("task=plan", f"model.path={folder}", env=env)          # the README's form: no model=
    assert run.returncode == 0, run.stderr
    assert f"model: checkpoint {folder}" in run.stdout and "3 decoder layers" in run.stdout
