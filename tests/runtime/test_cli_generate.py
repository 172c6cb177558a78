"""The main command as a user runs it: the JSON contract, and bad input that exits non-zero, names the fix
and leaves earlier results intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.slow


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qvl_pipeline", "progress=false", *args], capture_output=True,
                          text=True, timeout=300, input=stdin, env=dict(os.environ))


def test_json_contract_prints_exactly_one_object(tmp_path):
    image = tmp_path / "odd.png"
    Image.new("RGB", (97, 61), (200, 30, 30)).save(image)
    run = cli(f"image={image}", "prompt=What colour?", "generate.max_new_tokens=5", "generate.temperature=0",
              "output=json", f"results_dir={tmp_path / 'out'}")
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)      # the whole stdout is one JSON object
    for key in ("text", "token_ids", "prompt_tokens", "plan", "timings"):
        assert key in result
    assert len(result["token_ids"]) <= 5 and result["images"] == [str(image)]
    assert json.loads((tmp_path / "out" / "result.json").read_text())["token_ids"] == result["token_ids"]
    assert (tmp_path / "out" / "plan.json").exists()


def test_text_mode_streams_and_says_it_is_a_demo():
    run = cli("generate.max_new_tokens=4")
    assert run.returncode == 0, run.stderr
    assert "DEMO weights" in run.stderr and "== plan:" in run.stderr


def test_chat_keeps_the_cache_between_turns():
    run = cli("task=chat", "generate.max_new_tokens=3", stdin="What is it?\nAnd then?\n/quit\n")
    assert run.returncode == 0, run.stderr
    assert "turn 1:" in run.stderr and "turn 2:" in run.stderr
    reused = int(run.stderr.split("turn 2:")[1].split(",")[1].split()[0])
    assert reused > 0


def _bad_checkpoint(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    return folder


def _huge_image(tmp_path: Path) -> Path:
    path = tmp_path / "huge.png"
    Image.new("L", (3000, 3000)).save(path)
    return path


@pytest.mark.parametrize(("make_args", "expected"), [
    (lambda t: [f"model.path={t / 'nowhere'}"], "is not a folder"),
    (lambda t: [f"model.path={_bad_checkpoint(t)}"], "not valid JSON"),
    (lambda t: ["model=qwen3_vl_2b"], "set model.path to run it"),
    (lambda t: [f"image={t / 'missing.jpg'}"], "missing.jpg"),
    (lambda t: [f"image={(t / 'x.jpg').write_text('no image') and t / 'x.jpg'}"], "x.jpg"),
    (lambda t: [f"image={_huge_image(t)}", "processing.max_image_pixels=1000000"], "max_image_pixels"),
    (lambda t: ["generate.max_context=8", "prompt=hello"], "the context holds 8"),
    (lambda t: ["generate.top_p=7"], "generate.top_p"),
    (lambda t: ["attention=nonsense"], "eager"),
])
def test_bad_input_names_the_problem_and_keeps_earlier_results(tmp_path, make_args, expected):
    out = tmp_path / "out"
    out.mkdir()
    (out / "result.json").write_text('{"earlier": true}')
    run = cli(*make_args(tmp_path), f"results_dir={out}")
    assert run.returncode != 0
    assert expected in run.stderr, run.stderr
    assert "Traceback" not in run.stderr
    assert json.loads((out / "result.json").read_text()) == {"earlier": True}
