"""`python -m qvl_pipeline`: the only module that knows Hydra's entry point, and the one place that turns every way
a run can end into an exit status and at most one message on stderr (never a traceback unless QVL_DEBUG=1):

  0 done · 2 config · 3 plugin · 4 input · 5 checkpoint · 6 results folder · 7 NaN/Inf in the model ·
  1 unexpected failure (a bug) · 130 Ctrl-C · 143 SIGTERM (129 SIGHUP) · 141 stdout closed by its reader
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any

from qvl_pipeline.errors import (
    DEBUG_ENV,
    EXIT_BROKEN_PIPE,
    EXIT_INTERRUPTED,
    EXIT_UNEXPECTED,
    ConfigError,
    OutputError,
    QvlError,
    describe_unexpected,
)
from qvl_pipeline.registry import SLOT_NAMES

TASKS = ("generate", "chat", "plan", "probe", "validate", "bench", "tune")
WARM_START_TASKS = ("generate", "chat")    # tasks whose start reads early what their last such run read at load
ASSEMBLY_GROUPS = ("hardware", "opt", "model", "task", *SLOT_NAMES)   # the config groups that decide what a load reads
REEXEC_GUARD = "QVL_EMULATION_APPLIED"
_ORIGINAL_ARGS: list[str] = []     # the command line as typed (the emulation re-exec passes it on unchanged)
_TASK_STARTED: list[bool] = []     # set once Hydra hands over: an OSError before that is about the run folder


class Terminated(BaseException):
    """SIGTERM / SIGHUP, raised in the main thread so that cleanup (temp files) runs; not an Exception, so no
    `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated(signum)


def _install_signal_handlers() -> None:
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, _raise_terminated)


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _say(text: str) -> None:
    """A line on stderr; a closed stderr is not worth a second failure."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _results_dir(config: Any) -> Path | None:
    """The run's results folder, created and write-probed now (before any model loads): results_dir, else
    Hydra's run folder (unique per run), else none (the Python API)."""
    from qvl_pipeline.tasks.results import prepare_results_dir

    path: str | None = config.results_dir
    if not path:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = HydraConfig.get().runtime.output_dir
        except ValueError:
            return None
    return prepare_results_dir(path)


def _apply_hardware(container: Any) -> None:
    """Set the run's threads; when emulating a profile (ISA caps) or binding threads to cores, the environment must
    be in force before torch starts, so re-exec once (into the same run folder, with the command line as typed)."""
    from qvl_pipeline.config.load import literal
    from qvl_pipeline.hardware.effective import apply_threads, env_pending, process_env

    report = container.core.hardware_report()
    pending = env_pending(process_env(report.profile, report.emulate, report.threads))
    if pending and not os.environ.get(REEXEC_GUARD):
        env = {**os.environ, **pending, REEXEC_GUARD: "1"}
        args = list(_ORIGINAL_ARGS)
        try:
            from hydra.core.hydra_config import HydraConfig

            if not any(a.startswith("hydra.run.dir=") for a in args):
                args.append(f"hydra.run.dir={literal(HydraConfig.get().runtime.output_dir)}")
        except ValueError:
            pass
        why = " and ".join(([f"emulating {report.target}"] if report.emulate else [])
                           + (["binding threads to cores"] if report.threads and report.threads.pinned else []))
        _say(f"{why}: restarting with {' '.join(f'{k}={v}' for k, v in pending.items())}")
        os.execve(sys.executable, [sys.executable, "-m", "qvl_pipeline", *args], env)
    if report.threads is not None:
        apply_threads(report.threads)


def assembly_signature(config: dict[str, Any]) -> str:
    """A name for what decides the weights a load reads: the ASSEMBLY_GROUPS of the composed config (plain values)."""
    import hashlib
    import json

    picked = {name: config.get(name) for name in ASSEMBLY_GROUPS}
    return hashlib.sha256(json.dumps(picked, sort_keys=True, default=str).encode()).hexdigest()[:32]


def run_task(cfg: Any) -> int:
    """Run the configured task (QvlErrors and everything else propagate to `main`, which reports them)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from qvl_pipeline import warm_start

    _TASK_STARTED.append(True)
    # First, before anything imports torch: read what the last run with these settings read at load, meanwhile
    # (not for the tasks that time loads themselves: a reader in the background would warm what they measure cold)
    early = 0
    try:
        if cfg.task.name in WARM_START_TASKS:
            early = warm_start.begin(assembly_signature(OmegaConf.to_container(cfg, resolve=True)))
    except OmegaConfBaseException:
        pass                                         # a config that does not resolve: typed() names the problem

    from qvl_pipeline.config.load import typed

    config = typed(cfg)                              # typed and range-checked
    task = config.task.name
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}", f"use task=<one of {', '.join(TASKS)}>")
    results = None if task == "probe" else _results_dir(config)   # a folder that cannot be written fails now
    if early:
        _say(f"warm start: reading the {early / 2**20:,.1f} MiB of weights the last run with these settings read "
             "at load, while starting")

    from qvl_pipeline.container import make_container
    from qvl_pipeline.runtime.heap import keep_large_blocks

    keep_large_blocks()                              # per-layer scratch of tens of MiB reused, not re-faulted
    container = make_container(config)
    _apply_hardware(container)
    if task == "probe":
        from qvl_pipeline.tasks import probe
        return probe.run(config, container)
    if task == "plan":
        from qvl_pipeline.tasks import plan
        return plan.run(config, container, results)
    if task == "chat":
        from qvl_pipeline.tasks import chat
        return chat.run(config, container, results)
    if task == "validate":
        from qvl_pipeline.tasks import validate
        return validate.run(config, container, results)
    if task == "bench":
        from qvl_pipeline.tasks import bench
        return bench.run(config, container, results)
    if task == "tune":
        from qvl_pipeline.tasks import tune
        return tune.run(config, container, results)
    from qvl_pipeline.tasks import generate
    return generate.run(config, container, results)


def _hydra_main(args: list[str]) -> int:
    """Compose with Hydra (which makes the run folder) and run the task; returns the task's exit status."""
    import hydra

    from qvl_pipeline.config.load import prepare_overrides, register_resolvers
    from qvl_pipeline.config.schema import register_schemas
    from qvl_pipeline.tasks.results import begin_run

    prepared = prepare_overrides(args)              # user text made literal; bad syntax named with how to quote
    begin_run(args)
    register_schemas()
    register_resolvers()                            # ${qvl_run_id:} in hydra.run.dir: one folder per run
    os.environ["HYDRA_FULL_ERROR"] = "1"            # Hydra's errors come here, to be reported like ours
    outcome: list[int] = []
    failure: list[Exception] = []

    @hydra.main(config_path="conf", config_name="config", version_base=None)
    def entry(cfg: Any) -> None:
        try:
            outcome.append(run_task(cfg))
        except Exception as exc:                    # carried out of Hydra, which would print its own line first
            failure.append(exc)

    sys.argv[1:] = prepared
    entry()
    if failure:
        raise failure[0]
    return outcome[0] if outcome else 0


def _quiet_stdout() -> None:
    """The reader of stdout went away: point stdout at /dev/null so the flush at exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main() -> None:
    """Run the CLI and exit with its status; the only place a run's end is reported (see the module's doc)."""
    _install_signal_handlers()
    _ORIGINAL_ARGS[:] = sys.argv[1:]
    try:
        code = _hydra_main(list(sys.argv[1:]))
        sys.stdout.flush()                          # a closed pipe shows here, not at interpreter exit
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if _debug():
            traceback.print_exc()
        _say("\nqvl-pipeline: interrupted")
        code = EXIT_INTERRUPTED
    except Terminated as exc:
        _say(f"\nqvl-pipeline: terminated by {signal.Signals(exc.signum).name}")
        code = 128 + exc.signum
    except BrokenPipeError:
        _quiet_stdout()
        code = EXIT_BROKEN_PIPE
    except QvlError as exc:
        if _debug():
            traceback.print_exc()
        _say(f"qvl-pipeline: error: {exc}")
        code = exc.exit_code
    except OSError as exc:
        if _debug():
            traceback.print_exc()
        if not _TASK_STARTED and exc.filename is not None:   # Hydra could not make or write the run folder
            error = OutputError(f"cannot make the run folder: {exc.strerror or exc}: {exc.filename}",
                                "set QVL_RUNS_DIR to a writable folder (default: ./runs) or run from one")
            _say(f"qvl-pipeline: error: {error}")
            code = error.exit_code
        else:
            _say(f"qvl-pipeline: error: {describe_unexpected(exc)}")
            code = EXIT_UNEXPECTED
    except Exception as exc:
        from qvl_pipeline.config.load import hydra_config_error

        if _debug():
            traceback.print_exc()
        known = hydra_config_error(exc)
        if known is not None:
            _say(f"qvl-pipeline: error: {known}")
            code = known.exit_code
        else:
            _say(f"qvl-pipeline: error: {describe_unexpected(exc)}")
            code = EXIT_UNEXPECTED
    sys.exit(code)


if __name__ == "__main__":
    main()
