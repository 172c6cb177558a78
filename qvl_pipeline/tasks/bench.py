"""task=bench: load time, vision, prefill, TTFT, decode speed and peak memory of this run's configuration (and of
transformers with bench.compare=transformers), each system in a fresh process, next to the decode ceiling the
measured RAM bandwidth allows for the weight bytes that really ran; then the level's accuracy against the exact
path; with bench.ssd=true, also decoding with the weights streamed from disk under a RAM budget
(qvl_pipeline/bench/ssd.py). Prints a table, writes bench.json (and the run's plan.json) into the run folder as one
unit."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline import errors
from qvl_pipeline.bench import ssd
from qvl_pipeline.bench.accuracy import ACCURACY_TOKENS, tiny_accuracy
from qvl_pipeline.bench.picture import bench_picture
from qvl_pipeline.bench.random_checkpoint import random_checkpoint_folder, write_random_checkpoint
from qvl_pipeline.bench.report import render, with_ceiling
from qvl_pipeline.bench.worker import PROGRESS_PREFIX, config_to_dict, progress
from qvl_pipeline.config.load import run_id
from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.errors import ConfigError, QvlError
from qvl_pipeline.hardware.probe import measure_memory_gb_s
from qvl_pipeline.processing.image_io import load_image
from qvl_pipeline.runtime.assembly import model_facts
from qvl_pipeline.tasks.generate import request_prompt
from qvl_pipeline.tasks.results import write_unit

OURS = "qvl-pipeline"
REFERENCE = "transformers"
STDERR_TAIL = 20              # lines of a failed worker's stderr kept for its error message


def transformers_available() -> bool:
    """Whether the reference implementation can be imported (it comes with the `test` extra)."""
    return importlib.util.find_spec("transformers") is not None


def checkpoint(config: RootConfig) -> tuple[Path, str]:
    """(folder, how it was chosen): model.path, else the random checkpoint of bench.model's shape (written once)."""
    if config.model.path:
        return Path(config.model.path).expanduser(), f"checkpoint {config.model.path}"
    folder = random_checkpoint_folder(config.bench.model)
    if not (folder / "config.json").exists():
        progress(f"writing a random checkpoint of {config.bench.model}'s shape to {folder} (once)")
    return write_random_checkpoint(folder, config.bench.model), f"random checkpoint of {config.bench.model}'s shape"


def picture(config: RootConfig) -> Path:
    """bench.image (checked now: it exists and decodes), else the generated 448x448 picture."""
    path = Path(config.bench.image).expanduser() if config.bench.image else bench_picture()
    load_image(path, config.processing.max_image_pixels)
    return path


def run_worker(kind: str, spec: dict[str, Any], label: str) -> dict[str, Any]:
    """One system in a fresh process; its `bench:` progress lines are passed on, its result (or error) returned."""
    with tempfile.TemporaryDirectory(prefix="qvl-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        tail: deque[str] = deque(maxlen=STDERR_TAIL)
        proc = subprocess.Popen([sys.executable, "-m", "qvl_pipeline.bench.worker", kind, str(spec_path),
                                 str(result_path)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, errors="replace")
        try:
            assert proc.stderr is not None
            for line in proc.stderr:
                if line.startswith(PROGRESS_PREFIX):
                    print(line, end="", file=sys.stderr, flush=True)
                elif line.strip():
                    tail.append(line.strip())
            proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError, ValueError):
            return json.loads(result_path.read_text(encoding="utf-8"))
    last = tail[-1] if tail else "(nothing on stderr)"
    return {"error": {"type": "RuntimeError", "message": f"{label} exited with status {proc.returncode}: {last}",
                      "hint": ""}}


def raise_worker_error(error: dict[str, str]) -> None:
    """Re-raise a worker's QvlError here (same class, message and fix: same exit status); anything else is a bug."""
    cls = getattr(errors, error["type"], None)
    if isinstance(cls, type) and issubclass(cls, QvlError):
        raise cls(error["message"], error["hint"])
    raise RuntimeError(error["message"])


def build_report(config: RootConfig, source: str, image: Path, prompt: str, bandwidth: float,
                 systems: dict[str, dict[str, Any]], accuracy: dict[str, Any]) -> dict[str, Any]:
    from PIL import Image

    ours = systems[OURS]
    with Image.open(image) as img:
        size = f"{img.width}x{img.height}"
    rows = {}
    for name, row in systems.items():
        if "error" in row:
            rows[name] = {"error": row["error"]["message"]}
        elif "skipped" in row:
            rows[name] = row
        else:
            rows[name] = with_ceiling({k: v for k, v in row.items() if k != "plan"}, bandwidth)
    return {
        "run_id": run_id(), "opt_level": config.opt.level, "hardware": config.hardware.name,
        "checkpoint": {"source": source, "folder": ours["plan"]["model"]["folder"],
                       "parameters": ours["plan"]["model"]["parameters"]["total"],
                       "stored_dtype": ours["plan"]["model"]["dtype"]},
        "work": {"image": str(image), "image_size": size, "prompt": prompt, "tokens": config.bench.tokens,
                 "rounds": config.bench.rounds, "threads": torch.get_num_threads()},
        "ram_bandwidth_gb_s": bandwidth, "systems": rows, "accuracy": accuracy,
    }


def ssd_part(run_config: RootConfig, folder: Path, config: RootConfig) -> dict[str, Any]:
    """bench.ssd=true: memory=ssd_stream under a RAM budget of bench.ssd_share of the weights (with the page cache
    dropped and kept), the resident run and accelerate's disk offload when installed, bench.rounds interleaved
    repetitions of bench.tokens new tokens (qvl_pipeline.bench.ssd); a failed measurement is reported, not raised."""
    bench = config.bench
    progress(f"SSD streaming: ssd_stream under {bench.ssd_share:.0%} of the weights vs resident, {bench.rounds} "
             f"repetition(s), each run in a fresh process")
    try:
        return ssd.measure(run_config, folder, bench.ssd_share, bench.tokens, bench.rounds, say=progress)
    except RuntimeError as exc:
        return {"error": str(exc)}


def ssd_lines(part: dict[str, Any]) -> list[str]:
    return [f"SSD streaming: failed: {part['error']}"] if "error" in part else ssd.render(part)


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    if config.image or config.images or config.video:
        raise ConfigError("task=bench takes its picture from bench.image, not image=/images=/video=",
                          "use bench.image=PATH (or leave it unset for a generated 448x448 picture)")
    bench = config.bench
    prompt = request_prompt(config)
    image = picture(config)
    folder, source = checkpoint(config)
    run_config = dataclasses.replace(config, model=dataclasses.replace(config.model, path=str(folder)),
                                     progress=False)
    model_facts(run_config.model)               # a missing or broken checkpoint fails now, in one line
    if bench.ssd:                               # a streaming budget that cannot be planned fails now, too
        ssd.budget_gib(ssd.stream_config(run_config, bench.tokens), bench.ssd_share)
    progress("measuring RAM read bandwidth")
    bandwidths = [measure_memory_gb_s()]
    spec = {"config": config_to_dict(run_config), "folder": str(folder), "image": str(image), "prompt": prompt,
            "tokens": bench.tokens, "rounds": bench.rounds, "accuracy": bench.accuracy,
            "accuracy_tokens": ACCURACY_TOKENS, "threads": torch.get_num_threads()}
    progress(f"{OURS} opt={config.opt.level} in a fresh process: load, warm-up, {bench.rounds} round(s) of "
             f"{bench.tokens} tokens" + (", accuracy vs opt=minimal" if bench.accuracy else ""))
    systems = {OURS: run_worker("ours", spec, OURS)}
    if "error" in systems[OURS]:
        raise_worker_error(systems[OURS]["error"])
    progress("measuring RAM read bandwidth again (the ceiling takes the higher of the two)")
    bandwidths.append(measure_memory_gb_s())
    bandwidth = max(bandwidths)
    if bench.compare == REFERENCE:
        if transformers_available():
            progress(f"{REFERENCE} (bf16, sdpa) in a fresh process: load, warm-up, {bench.rounds} round(s)")
            systems[REFERENCE] = run_worker("reference", {**spec, "pixels": systems[OURS]["pixels"]}, REFERENCE)
        else:
            note = ("transformers is not installed: bench.compare=transformers skipped (pip install transformers, "
                    "or the project's test extra)")
            print(f"qvl-pipeline: {note}", file=sys.stderr, flush=True)
            systems[REFERENCE] = {"skipped": note}
    accuracy: dict[str, Any] = {}
    if bench.accuracy:
        progress("accuracy on the tiny parity config")
        accuracy["tiny parity config"] = tiny_accuracy(config, prompt)
        accuracy["the benchmarked checkpoint"] = systems[OURS].pop("accuracy")
    report = build_report(config, source, image, prompt, bandwidth, systems, accuracy)
    if bench.ssd:
        report["ssd"] = ssd_part(run_config, folder, config)
    if config.output == "json":
        print(json.dumps(report, indent=2))
    else:
        print(render(report) + ("\n\n" + "\n".join(ssd_lines(report["ssd"])) if bench.ssd else ""))
    if results_dir is not None:
        written = write_unit(results_dir, {"bench.json": report, "plan.json": systems[OURS]["plan"]})
        progress(f"written: {written[0]}")
    return 0
