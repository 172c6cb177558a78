"""task=bench: the table and bench.json carry every column with sane values, the decode ceiling uses the bytes of
the weight format that ran, transformers runs in its own process (or says in one line that it is missing), the
accuracy section compares the level with opt=minimal, and bad config or input is refused before anything runs.
Speed is never asserted."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch

from qvl_pipeline.bench import report as bench_report
from qvl_pipeline.bench import ssd
from qvl_pipeline.bench.worker import config_from_dict, config_to_dict, tensor_bytes, weights_read_per_token
from qvl_pipeline.config.load import load_config
from qvl_pipeline.container import make_container
from qvl_pipeline.errors import CheckpointError, ConfigError, InputError
from qvl_pipeline.tasks import bench
from tests.conftest import write_tiny_checkpoint

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning")]

COLUMNS = ("load_s", "vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s", "peak_rss_gib", "bytes_per_token",
           "ceiling_tokens_per_s", "fraction_of_ceiling")
HEADERS = ("load s", "vision s", "prefill s", "TTFT s", "decode tok/s", "peak RSS GiB", "GB read/token",
           "ceiling tok/s", "of ceiling")
TOKENS = 4


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A cache folder of the module's own (the tiny checkpoint, the picture, quantised weights) and the checkpoint."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QVL_CACHE_DIR", str(cache))
        folder = write_tiny_checkpoint(layers=2)
    return cache, folder


def cli_bench(dirs, results, *overrides):
    cache, folder = dirs
    # One compute thread: on a busy machine two spinning threads per process slow tiny models down 100-fold.
    env = {**os.environ, "QVL_CACHE_DIR": str(cache), "QVL_RUNS_DIR": str(results.parent / "runs"),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "qvl_pipeline", "task=bench", f"model.path={folder}",
                          f"bench.tokens={TOKENS}", "bench.rounds=1", f"results_dir={results}", *overrides],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr
    return run, json.loads((results / "bench.json").read_text()), results


@pytest.fixture(scope="module")
def int8_run(dirs, tmp_path_factory):
    """opt=moderate (int8 weights on this CPU) with transformers compared, through the CLI."""
    return cli_bench(dirs, tmp_path_factory.mktemp("int8"), "opt=moderate", "kernels=int8_weight_only",
                     "bench.compare=transformers")


@pytest.fixture(scope="module")
def minimal_run(dirs, tmp_path_factory):
    """opt=minimal in this process, asking for transformers while it is "not installed"."""
    cache, folder = dirs
    results = tmp_path_factory.mktemp("minimal")
    err = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(err):
        mp.setenv("QVL_CACHE_DIR", str(cache))
        mp.setattr(bench, "transformers_available", lambda: False)
        config = load_config(["task=bench", f"model.path={folder}", f"bench.tokens={TOKENS}", "bench.rounds=1",
                              "bench.compare=transformers", "bench.accuracy=false", "opt=minimal"])
        assert bench.run(config, make_container(config), results) == 0
    return err.getvalue(), json.loads((results / "bench.json").read_text()), results


@pytest.mark.slow
def test_the_table_and_json_have_every_column_with_sane_values(int8_run):
    run, report, _ = int8_run
    for header in HEADERS:
        assert header in run.stdout
    assert "RAM read bandwidth (measured" in run.stdout
    assert report["ram_bandwidth_gb_s"] > 0
    assert report["work"]["tokens"] == TOKENS and report["work"]["image_size"] == "448x448"
    assert report["work"]["threads"] == 1
    ours = report["systems"]["qvl-pipeline"]
    for key in COLUMNS:
        assert ours[key] is not None and ours[key] >= 0, key
    assert ours["vision_s"] > 0 and ours["prefill_s"] > 0 and ours["decode_tokens_per_s"] > 0
    assert ours["ttft_s"] == pytest.approx(ours["vision_s"] + ours["prefill_s"], abs=2e-4)
    assert ours["peak_rss_gib"] > 0.05 and 0 < ours["rss_after_load_gib"] <= ours["peak_rss_gib"]
    assert ours["ceiling_tokens_per_s"] == pytest.approx(
        report["ram_bandwidth_gb_s"] * 1e9 / ours["bytes_per_token"], rel=1e-3)
    assert ours["fraction_of_ceiling"] == pytest.approx(ours["decode_tokens_per_s"] / ours["ceiling_tokens_per_s"],
                                                        rel=1e-3)
    assert ours["kernels"] == "int8_weight_only" and ours["prompt_tokens"] > 10
    assert len(ours["rounds"]) == 1 and ours["rounds"][0]["new_tokens"] <= TOKENS


@pytest.mark.slow
def test_progress_lines_go_to_stderr_per_phase(int8_run):
    run, _, _ = int8_run
    progress = [line for line in run.stderr.splitlines() if line.startswith("bench: ")]
    for phase in ("measuring RAM read bandwidth", "qvl-pipeline: loading", "warm-up", "round 1/1",
                  "transformers: loading", "accuracy on the tiny parity config", "written:"):
        assert any(phase in line for line in progress), phase
    assert not [line for line in run.stdout.splitlines() if line.startswith("bench: ")]


@pytest.mark.slow
def test_transformers_runs_in_its_own_process_on_the_same_prompt(int8_run):
    _, report, _ = int8_run
    ours, reference = report["systems"]["qvl-pipeline"], report["systems"]["transformers"]
    assert "error" not in reference, reference
    assert reference["prompt_tokens"] == ours["prompt_tokens"]
    for key in COLUMNS:
        assert reference[key] is not None and reference[key] >= 0, key
    # transformers runs the checkpoint in bf16: its decode step reads 2 bytes per weight; ours reads int8 codes.
    assert set(reference["weights_read_per_token"]["by_dtype"]) == {"bfloat16"}
    assert reference["bytes_per_token"] > ours["bytes_per_token"]


@pytest.mark.slow
def test_the_ceiling_uses_the_bytes_of_the_format_that_ran(int8_run, minimal_run):
    _, int8, _ = int8_run
    _, minimal, _ = minimal_run
    ours_int8, ours_minimal = int8["systems"]["qvl-pipeline"], minimal["systems"]["qvl-pipeline"]
    assert ours_minimal["kernels"] == "torch_native"
    assert "int8" in ours_int8["weights_read_per_token"]["by_dtype"]
    assert "int8" not in ours_minimal["weights_read_per_token"]["by_dtype"]
    assert ours_int8["bytes_per_token"] < ours_minimal["bytes_per_token"]
    # The same bandwidth would allow the int8 run more tokens per second.
    assert ours_int8["bytes_per_token"] * ours_int8["ceiling_tokens_per_s"] == pytest.approx(
        int8["ram_bandwidth_gb_s"] * 1e9, rel=1e-3)


@pytest.mark.slow
def test_accuracy_against_opt_minimal_on_tiny_and_on_the_checkpoint(int8_run):
    run, report, _ = int8_run
    assert "accuracy of opt=moderate against the exact path" in run.stdout
    accuracy = report["accuracy"]
    assert set(accuracy) == {"tiny parity config", "the benchmarked checkpoint"}
    for result in accuracy.values():
        assert 0 <= result["agree"] <= result["compared"] <= 32
        assert result["compared"] >= 1
        assert 0 < result["max_abs_logit_error"] < result["exact_logit_range"]     # int8: close, not identical
        assert 0 < result["rel_logit_error"] < 0.2
    assert accuracy["tiny parity config"]["plugins"]["kernels"] == "int8_weight_only"


@pytest.mark.slow
def test_no_accuracy_section_when_turned_off(minimal_run):
    _, report, _ = minimal_run
    assert report["accuracy"] == {}


@pytest.mark.slow
def test_bench_json_is_written_with_the_plan_that_ran(int8_run):
    _, report, results = int8_run
    plan = json.loads((results / "plan.json").read_text())
    assert plan["slots"]["kernels"]["chosen"] == report["systems"]["qvl-pipeline"]["kernels"]
    assert report["checkpoint"]["parameters"] == plan["model"]["parameters"]["total"] > 0
    assert report["opt_level"] == "moderate" and report["run_id"]
    assert not list(results.glob(".*.tmp"))


@pytest.mark.slow
def test_missing_transformers_is_one_line_and_the_rest_still_runs(minimal_run):
    stderr, report, results = minimal_run
    lines = [line for line in stderr.splitlines() if "transformers is not installed" in line]
    assert len(lines) == 1 and "Traceback" not in stderr
    assert "skipped" in report["systems"]["transformers"]
    assert report["systems"]["qvl-pipeline"]["decode_tokens_per_s"] > 0
    assert (results / "plan.json").exists()


@pytest.fixture(scope="module")
def ssd_run(dirs, tmp_path_factory):
    """opt=minimal with the SSD streaming part, through the CLI."""
    return cli_bench(dirs, tmp_path_factory.mktemp("ssd"), "opt=minimal", "bench.accuracy=false", "bench.ssd=true")


@pytest.mark.slow
def test_bench_ssd_puts_its_rows_into_the_table_and_json(ssd_run):
    run, report, _ = ssd_run
    part = report["ssd"]
    assert set(part["rows"]) == {ssd.STREAMED_DROPPED, ssd.STREAMED_CACHED, ssd.RESIDENT, ssd.ACCELERATE}
    for name in (ssd.STREAMED_DROPPED, ssd.STREAMED_CACHED, ssd.RESIDENT):
        row = part["rows"][name]
        assert {"decode_tokens_per_s", "peak_rss_mib", "rss_over_budget", "disk_read_gb_s",
                "fraction_of_sequential_read"} <= set(row), row
        assert row["decode_tokens_per_s"] > 0 and row["peak_rss_mib"] > 0
    streamed = part["runs"][ssd.STREAMED_DROPPED][0]
    assert streamed["streamed_gib"] > 0 and "on disk" in streamed["placement"]      # it really streamed
    assert len(part["sequential_read_mb_s"]) == part["reps"] == 1 and part["tokens"] == TOKENS
    assert part["identical_tokens_ours"]
    assert "SSD streaming: RAM budget" in run.stdout
    for name in part["rows"]:
        assert name in run.stdout
    assert report["systems"]["qvl-pipeline"]["decode_tokens_per_s"] > 0           # the usual rows are still there


@pytest.mark.slow
def test_the_default_bench_has_no_ssd_part(minimal_run):
    stderr, report, _ = minimal_run
    assert "ssd" not in report and "SSD streaming" not in stderr


def test_the_streaming_budget_is_never_below_what_ssd_stream_admits(dirs, monkeypatch):
    """A tiny model's 30% is below the process's own runtime: the budget is the smallest ssd_stream admits, and with
    it the planner leaves every part on disk."""
    cache, folder = dirs
    monkeypatch.setenv("QVL_CACHE_DIR", str(cache))
    config = ssd.stream_config(load_config([f"model.path={folder}", "opt=minimal"]), TOKENS)
    assert config.generate.max_context == ssd.PROMPT_POSITIONS + TOKENS
    budget = ssd.budget_gib(config, 0.3)
    assert budget["ram_budget_gib"] > 0.3 * budget["weights_gib"] and "smallest ssd_stream admits" in budget["source"]
    memory = make_container(ssd.with_memory(config, "ssd_stream", budget["ram_budget_gib"])).core.memory()
    plan = memory.plan()
    assert set(plan.layers) == {"disk"} and (plan.vision, plan.head) == ("disk", "disk")
    assert plan.ram <= budget["ram_budget_gib"] * 1024**3


def test_the_ssd_summary_relates_each_run_to_the_disk_and_to_accelerate():
    report = {"ram_budget_gib": 0.5, "sequential_read_mb_s": [1000, 3000],
              "runs": {ssd.STREAMED_DROPPED: [{"decode_tokens_per_s": 4.0, "peak_rss_mib": 256.0,
                                       "disk_gb_s_over_generate": 1.4}],
                       ssd.RESIDENT: [{"error": "boom"}],
                       ssd.ACCELERATE: [{"decode_tokens_per_s": 2.0, "peak_rss_mib": 900.0}]}}
    rows = ssd.summarise(report)
    assert rows[ssd.STREAMED_DROPPED] == {"decode_tokens_per_s": 4.0, "peak_rss_mib": 256.0, "rss_over_budget": 0.5,
                                  "disk_read_gb_s": 1.4, "fraction_of_sequential_read": 0.7, "vs_accelerate": 2.0}
    assert rows[ssd.RESIDENT] == {"error": "boom"}
    assert rows[ssd.ACCELERATE]["vs_accelerate"] is None
    assert "skipped" in ssd.summarise({**report, "runs": {ssd.ACCELERATE: []}})[ssd.ACCELERATE]


@pytest.mark.parametrize(("override", "key"), [
    ("bench.tokens=0", "bench.tokens"),
    ("bench.tokens=100000", "bench.tokens"),
    ("bench.rounds=0", "bench.rounds"),
    ("bench.compare=llamacpp", "bench.compare"),
    ("bench.model=qwen9_giant", "bench.model"),
    ("bench.image=", "bench.image"),
    ("bench.ssd_share=0", "bench.ssd_share"),
    ("bench.ssd_share=1.5", "bench.ssd_share"),
    ("bench.ssd_share=nan", "bench.ssd_share"),
])
def test_bad_bench_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as caught:
        load_config(["task=bench", override])
    assert key in caught.value.message and "\n" not in caught.value.message


def test_a_missing_picture_is_refused_before_any_worker_starts(dirs, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_worker", lambda *a: pytest.fail("a worker started"))
    config = load_config(["task=bench", f"model.path={dirs[1]}", f"bench.image={tmp_path / 'nope.png'}"])
    with pytest.raises(InputError):
        bench.run(config, make_container(config), tmp_path)


def test_image_keys_other_than_bench_image_are_refused(dirs, tmp_path):
    config = load_config(["task=bench", f"model.path={dirs[1]}", f"image={tmp_path / 'a.png'}"])
    with pytest.raises(ConfigError, match=r"bench\.image"):
        bench.run(config, make_container(config), tmp_path)


def test_a_folder_without_a_checkpoint_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "run_worker", lambda *a: pytest.fail("a worker started"))
    config = load_config(["task=bench", f"model.path={tmp_path}"])
    with pytest.raises(CheckpointError):
        bench.run(config, make_container(config), tmp_path)


def test_a_worker_error_is_raised_with_its_own_class():
    with pytest.raises(InputError, match="bad picture") as caught:
        bench.raise_worker_error({"type": "InputError", "message": "bad picture", "hint": "another one"})
    assert caught.value.hint == "another one"
    with pytest.raises(RuntimeError):
        bench.raise_worker_error({"type": "ZeroDivisionError", "message": "boom", "hint": ""})


def test_the_config_travels_to_the_worker_unchanged():
    config = load_config(["task=bench", "prompt=It's ${HOME}, #1", "bench.tokens=3", "opt=aggressive",
                          "attention.options.chunked.chunk_size=64"])
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config


def test_bytes_per_token_count_shared_tensors_once():
    shared = torch.zeros(4, 8, dtype=torch.bfloat16)                 # e.g. a head tied to the embedding
    layers = torch.nn.ModuleList([torch.nn.Linear(8, 4, bias=False)])   # fp32 [4, 8]
    norm = torch.nn.LayerNorm(8)                                         # fp32 weight and bias [8]
    result = weights_read_per_token(layers, norm, [shared, shared])
    assert result["by_dtype"] == {"float32": 4 * 8 * 4 + 2 * 8 * 4, "bfloat16": shared.nbytes}
    assert result["bytes"] == sum(result["by_dtype"].values())
    assert tensor_bytes([shared, shared]) == {"bfloat16": shared.nbytes}


def test_ceiling_is_bandwidth_over_bytes():
    row = {"weights_read_per_token": {"bytes": 2_000_000_000, "by_dtype": {"int8": 2_000_000_000}},
           "decode_tokens_per_s": 5.0}
    out = bench_report.with_ceiling(row, 20.0)
    assert out["ceiling_tokens_per_s"] == pytest.approx(10.0)
    assert out["fraction_of_ceiling"] == pytest.approx(0.5)
    assert bench_report.with_ceiling(row, 0.0)["ceiling_tokens_per_s"] is None
