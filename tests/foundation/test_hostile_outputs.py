"""Hostile environments around a run, in process: results folders that cannot be written (checked before any model
loads), outputs saved as one unit with no temp files left behind, prompt files, disk measurement that never walks
the current folder, sampling that survives extreme settings, and the CLI's top-level reporting."""

from __future__ import annotations

import errno
import io
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from qvl_pipeline.errors import ConfigError, InputError, QvlError


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


# ---- results folder --------------------------------------------------------------------------------------------
def test_a_results_folder_that_is_a_file_is_refused(tmp_path):
    from qvl_pipeline.tasks.results import prepare_results_dir

    (tmp_path / "out").write_text("not a folder")
    with pytest.raises(QvlError, match="is a file") as err:
        prepare_results_dir(tmp_path / "out")
    assert err.value.exit_code == 6


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_a_results_folder_that_cannot_be_written_is_refused_before_loading(tmp_path, monkeypatch, error):
    from qvl_pipeline.tasks.results import prepare_results_dir

    def fail(fd):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(QvlError, match=os.strerror(error)):
        prepare_results_dir(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []          # the probe file is gone


def test_saved_results_are_one_self_contained_unit(tmp_path):
    from qvl_pipeline.config.load import load_config
    from qvl_pipeline.tasks.results import request_record, save_results

    config = load_config(["prompt=What is it?"])
    result = {"text": "hi", "token_ids": [1, 2], "plan": {"slots": {"attention": "eager"}}}
    save_results(tmp_path, result, request=request_record(config, "What is it?", ["a.png"]))
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["request"]["prompt"] == "What is it?" and saved["request"]["images"] == ["a.png"]
    assert saved["request"]["generate"]["max_new_tokens"] == config.generate.max_new_tokens
    assert saved["run_id"] and saved["plan"] == json.loads((tmp_path / "plan.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "result.json"]


@pytest.mark.parametrize("fail_at", [1, 2])
def test_a_failed_save_keeps_the_earlier_run_and_leaves_no_temp_files(tmp_path, monkeypatch, fail_at):
    from qvl_pipeline.tasks import results

    (tmp_path / "plan.json").write_text('{"earlier": "plan"}')
    (tmp_path / "result.json").write_text('{"earlier": "result"}')
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == fail_at:
            _enospc()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(QvlError, match="No space left") as err:
        results.save_results(tmp_path, {"text": "new", "plan": {"new": True}})
    assert err.value.exit_code == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "result.json"]
    assert json.loads((tmp_path / "plan.json").read_text()) == {"earlier": "plan"}
    assert json.loads((tmp_path / "result.json").read_text()) == {"earlier": "result"}


def test_ctrl_c_during_the_renames_is_held_until_both_files_are_in_place(tmp_path, monkeypatch):
    import signal

    from qvl_pipeline.tasks import results

    real_replace = os.replace
    seen = []

    def replace(src, dst):
        if not seen:
            signal.raise_signal(signal.SIGINT)     # arrives between the two renames
        seen.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)    # also when the suite inherited it ignored
    try:
        with pytest.raises(KeyboardInterrupt):
            results.save_results(tmp_path, {"text": "new", "plan": {"new": True}})
    finally:
        signal.signal(signal.SIGINT, previous)
    assert seen == ["plan.json", "result.json"]
    assert json.loads((tmp_path / "result.json").read_text())["text"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "result.json"]


# ---- prompt files ----------------------------------------------------------------------------------------------
def test_prompt_file_text_is_the_prompt(tmp_path, monkeypatch):
    from qvl_pipeline.config.load import load_config
    from qvl_pipeline.tasks.generate import request_prompt

    path = tmp_path / "p.txt"
    path.write_text("Ünïcode ${oc.env:HOME}, it's #1\n", encoding="utf-8")
    assert request_prompt(load_config([f"prompt_file={path}"])) == "Ünïcode ${oc.env:HOME}, it's #1\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("from stdin ✓".encode())))
    assert request_prompt(load_config(["prompt_file=-"])) == "from stdin ✓"
    assert request_prompt(load_config(["prompt=plain"])) == "plain"


@pytest.mark.parametrize(("make", "expected"), [
    (lambda t: (t / "latin1.txt").write_bytes("café".encode("latin-1")) and t / "latin1.txt", "not valid UTF-8"),
    (lambda t: t / "missing.txt", "No such file"),
    (lambda t: t, "is a folder"),
])
def test_a_bad_prompt_file_is_an_input_error_naming_it(tmp_path, make, expected):
    from qvl_pipeline.tasks.generate import read_prompt_file

    path = make(tmp_path)
    with pytest.raises(InputError, match=expected) as err:
        read_prompt_file(str(path))
    assert str(path) in err.value.message


# ---- disk measurement ------------------------------------------------------------------------------------------
def test_measuring_without_a_model_never_walks_the_current_folder(tmp_path, monkeypatch):
    from qvl_pipeline.hardware import probe

    work = tmp_path / "work"
    (work / "deep" / "er").mkdir(parents=True)
    (work / "deep" / "er" / "big.bin").write_bytes(b"x" * 4096)
    monkeypatch.chdir(work)
    monkeypatch.setenv("QVL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(probe, "measure_memory_gb_s", lambda: 1.0)
    monkeypatch.setattr(probe, "SCRATCH_BYTES", 2 * 1024**2, raising=False)

    def no_walk(self, pattern):
        raise AssertionError(f"walked {self}")

    monkeypatch.setattr(Path, "rglob", no_walk)
    opened = []
    real_open = open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy_open)
    profile, _ = probe.probe_machine(None, measure=True)
    assert not any(name.startswith(str(work)) for name in opened), opened
    assert profile.storage.read_mb_s >= 0
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.endswith(".tmp")] == []


# ---- sampling --------------------------------------------------------------------------------------------------
def test_a_tiny_temperature_samples_the_best_token_instead_of_crashing():
    from qvl_pipeline.generation.sampling import Sampler, SamplingParams

    logits = torch.tensor([1.0, 3.0, 2.0])
    for temperature in (1e-30, 1e-45):
        assert Sampler(SamplingParams(temperature=temperature, top_p=0.9, top_k=2))(logits, []) == 1


def test_a_seed_torch_cannot_take_is_a_config_error():
    from qvl_pipeline.generation.sampling import SamplingParams

    with pytest.raises(ConfigError, match=r"generate\.seed"):
        SamplingParams(seed=2**64).check()


# ---- top-level reporting of the CLI ----------------------------------------------------------------------------
@pytest.mark.parametrize(("raised", "code", "expected"), [
    (RuntimeError("boom"), 1, "unexpected RuntimeError: boom; run with QVL_DEBUG=1 for the traceback"),
    (KeyboardInterrupt(), 130, "interrupted"),
    (InputError("bad thing", "do this"), 4, "qvl-pipeline: error: bad thing"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/f/runs/x"), 6, "cannot make the run folder"),
])
def test_the_cli_ends_every_failure_with_one_message_and_its_code(monkeypatch, capsys, raised, code, expected):
    from qvl_pipeline import __main__ as cli

    def fail(args):
        raise raised

    monkeypatch.delenv("QVL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "_hydra_main", fail)
    monkeypatch.setattr(sys, "argv", ["qvl_pipeline"])
    with pytest.raises(SystemExit) as ended:
        cli.main()
    err = capsys.readouterr().err
    assert ended.value.code == code and expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2


def test_qvl_debug_shows_the_traceback(monkeypatch, capsys):
    from qvl_pipeline import __main__ as cli

    def fail(args):
        raise RuntimeError("boom")

    monkeypatch.setenv("QVL_DEBUG", "1")
    monkeypatch.setattr(cli, "_hydra_main", fail)
    monkeypatch.setattr(sys, "argv", ["qvl_pipeline"])
    with pytest.raises(SystemExit):
        cli.main()
    assert "Traceback" in capsys.readouterr().err
