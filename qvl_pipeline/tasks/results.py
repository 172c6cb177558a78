"""A run's outputs: its folder is checked before any model loads, and its files are written as one unit.

Every file of a save goes to a temporary file first (written and synced); only when all of them are complete are
they renamed into place, one after the other with Ctrl-C / SIGTERM held back until the last rename is done. A
failure at any point removes every temporary file and leaves the files of an earlier run untouched. `result.json`
is self-contained: the request it answers (prompt, images, video, generation settings, the command line), the
plan and the output, stamped with the run's id; `plan.json` is a copy of its plan.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from qvl_pipeline.config.load import run_id
from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.errors import OutputError

PROBE_BYTES = 64 * 1024
_HELD_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                                  getattr(signal, "SIGHUP", None)) if s is not None)
_COMMAND: list[str] = []

def begin_run(command: Sequence[str]) -> None:
    """Record the command-line overrides of this run; each saved result names them in its request."""
    _COMMAND[:] = [str(arg) for arg in command]


def request_record(config: RootConfig, prompt: str, images: Sequence[str], video: Sequence[str] = ()) -> dict:
    """What a result answers: the prompt, the images and video frames, the generation settings, the model, the
    command line (plain data for result.json)."""
    return {"task": config.task.name, "prompt": prompt, "prompt_file": config.prompt_file,
            "images": list(images), "video": list(video), "model_path": config.model.path,
            "generate": asdict(config.generate), "command_line": list(_COMMAND)}


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def prepare_results_dir(path: Path | str) -> Path:
    """Create the results folder and prove it can be written (a probe file is written, synced and removed) before
    any model loads; an OutputError names the folder and the reason (a file in the way, read-only, disk full)."""
    folder = Path(path).expanduser()
    fix = "choose a writable folder with free space: results_dir=/some/folder (or set QVL_RUNS_DIR)"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"the results folder {folder} is a file, not a folder", fix) from None
    except OSError as exc:
        raise OutputError(f"cannot create the results folder {folder}: {_reason(exc)}", fix) from None
    if not folder.is_dir():
        raise OutputError(f"the results folder {folder} is a file, not a folder", fix)
    probe = folder / f".write-probe.{run_id()}.tmp"
    try:
        with open(probe, "wb") as fh:
            fh.write(b"\0" * PROBE_BYTES)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise OutputError(f"cannot write in the results folder {folder}: {_reason(exc)}", fix) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return folder


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold back Ctrl-C / SIGTERM / SIGHUP for the duration; one that arrived meanwhile is delivered after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    for sig in _HELD_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, lambda signum, frame: arrived.append(signum))
        except (ValueError, OSError):
            continue
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sig in arrived[:1]:
            signal.raise_signal(sig)


def write_unit(folder: Path, files: Mapping[str, Any]) -> list[Path]:
    """Write `files` ({name: JSON-able object}) into `folder` as one unit (see the module's doc); returns the paths.
    An OSError becomes an OutputError naming the folder; temporary files never outlive a failure."""
    folder = Path(folder)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, obj in files.items():
            tmp = folder / f".{name}.{run_id()}.tmp"
            staged.append((tmp, folder / name))
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(obj, indent=2, ensure_ascii=False))
                fh.flush()
                os.fsync(fh.fileno())
        with _signals_held():
            for tmp, final in staged:
                os.replace(tmp, final)
    except OSError as exc:
        raise OutputError(f"could not save the results in {folder}: {_reason(exc)}",
                          "free some space or choose another folder with results_dir=...; what was printed above "
                          "was not saved") from None
    finally:
        for tmp, _ in staged:
            with contextlib.suppress(OSError):
                tmp.unlink()
    return [final for _, final in staged]


def save_results(results_dir: Path, result: Mapping[str, Any], name: str = "result.json",
                 request: Mapping[str, Any] | None = None) -> Path:
    """results_dir/<name> (request + result + plan, with the run id) and results_dir/plan.json, as one unit;
    returns the result's path."""
    body = {"run_id": run_id(), "request": dict(request or {}), **result}
    write_unit(Path(results_dir), {"plan.json": result.get("plan", {}), name: body})
    return Path(results_dir) / name
