"""The command line under hostile conditions, as a user meets them: concurrent runs, user text that looks like
config, output folders that cannot be written, Ctrl-C / SIGTERM, a reader that closes the pipe. Every case ends
with at most one message, a meaningful exit status and no traceback."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow
COMMAND = [sys.executable, "-m", "qvl_pipeline", "progress=false"]


def cli(*args: str, stdin: str | bytes | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *args], capture_output=True, timeout=120, input=stdin,
                          env={**os.environ, **(env or {})}, text=not isinstance(stdin, bytes))


def _interruptible() -> None:
    """In the child before exec: Ctrl-C as at a terminal, also when the suite runs as a background job (which
    inherits SIGINT ignored, and Python then keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([*COMMAND, *args], stderr=subprocess.PIPE, env=dict(os.environ),
                            preexec_fn=_interruptible, **kwargs)


def wait_for(proc: subprocess.Popen, text: str, timeout: float = 60.0) -> str:
    """stderr of `proc` up to and including `text` (bounded wait)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"never printed {text!r}: {seen.decode(errors='replace')}"
        ready, _, _ = select.select([proc.stderr], [], [], left)
        if ready:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, f"stderr closed before {text!r}: {seen.decode(errors='replace')}"
            seen += chunk
    return seen.decode(errors="replace")


def finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[int, str]:
    """Exit status and the rest of stderr; the process is killed if it does not end in time."""
    try:
        _, err = proc.communicate(timeout=timeout)
        return proc.returncode, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_concurrent_runs_each_get_their_own_folder_and_record_their_literal_request(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "QVL_RUNS_DIR": str(runs)}
    prompts = ["${oc.env:HOME}, it's #1 = ~ok", "a, b\nc", None]
    procs = []
    try:
        for prompt in prompts:
            args = [f"prompt={prompt}"] if prompt is not None else ["prompt_file=-"]
            procs.append(subprocess.Popen([*COMMAND, "generate.max_new_tokens=1", "output=json", *args],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          env=env))
        outputs = [p.communicate(b"from stdin ${x}\n" if prompts[i] is None else b"", timeout=120)
                   for i, p in enumerate(procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err.decode()
    results = sorted(runs.rglob("result.json"))
    assert len(results) == 3                                   # (was: one folder, one surviving result.json)
    recorded = set()
    for path in results:
        saved = json.loads(path.read_text())
        assert path.parent.name.endswith(saved["run_id"]) and (path.parent / "plan.json").exists()
        recorded.add(saved["request"]["prompt"])
        assert not [f for f in path.parent.iterdir() if f.name.endswith(".tmp")]
    assert recorded == {"${oc.env:HOME}, it's #1 = ~ok", "a, b\nc", "from stdin ${x}\n"}


def test_a_results_folder_that_is_a_file_fails_before_the_model_loads(tmp_path):
    target = tmp_path / "out"
    target.write_text("precious")
    run = cli(f"results_dir={target}")
    assert run.returncode == 6 and "is a file, not a folder" in run.stderr, run.stderr
    assert "== plan" not in run.stderr and "Traceback" not in run.stderr
    assert target.read_text() == "precious"


@pytest.mark.parametrize(("args", "stdin", "code", "expected"), [
    (["generate.top_p=0.5,0.7"], None, 2, "in a shell"),
    (["prompt_file=-"], b"caf\xe9 au lait", 4, "not valid UTF-8"),
    (["image=/nonexistent/x.png"], None, 4, "x.png"),
    (["task=chat", "images=[/nonexistent/y.png]"], None, 4, "y.png"),
])
def test_bad_overrides_and_prompt_files_fail_fast_with_one_message(args, stdin, code, expected):
    run = cli(*args, stdin=stdin if stdin is not None else b"")
    err = run.stderr.decode()
    assert run.returncode == code and expected in err, err
    assert "Traceback" not in err and "== plan" not in err


def test_ctrl_c_at_the_chat_prompt_ends_quietly_with_130():
    proc = start("task=chat", stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        wait_for(proc, "> ")
        proc.send_signal(signal.SIGINT)
        code, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 130 and "interrupted" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_generation_ends_quietly(tmp_path, sig, code):
    out = tmp_path / "out"
    proc = start("generate.max_new_tokens=3000", f"results_dir={out}", stdout=subprocess.DEVNULL)   # within the context
    try:
        wait_for(proc, "DEMO weights")                        # printed just before generation starts
        time.sleep(0.3)
        proc.send_signal(sig)
        status, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == code and "Traceback" not in err, err
    assert ("interrupted" if sig == signal.SIGINT else "terminated") in err
    assert [p.name for p in out.iterdir()] == []             # nothing half-written, no temp files


def test_a_reader_that_closes_the_pipe_ends_the_run_quietly():
    proc = start("generate.max_new_tokens=300", stdout=subprocess.PIPE)
    try:
        wait_for(proc, "DEMO weights")
        os.read(proc.stdout.fileno(), 10)                     # `| head -c 10`
        proc.stdout.close()
        status, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert status == 141 and "Traceback" not in err and "BrokenPipe" not in err, err
