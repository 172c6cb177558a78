"""`python -m qvl_pipeline`: the only module that knows Hydra's entry point."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from qvl_pipeline.config.load import open_option_overrides, typed
from qvl_pipeline.config.schema import RootConfig, register_schemas
from qvl_pipeline.errors import ConfigError, QvlError

TASKS = ("generate", "chat", "plan", "probe")
REEXEC_GUARD = "QVL_EMULATION_APPLIED"


def _results_dir(cfg: RootConfig) -> Path | None:
    if cfg.results_dir:
        return Path(cfg.results_dir)
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return None


def _apply_emulation(container) -> None:
    """Cap threads and CPU ISA to the profile; the ISA cap needs a fresh interpreter, so re-exec once."""
    from qvl_pipeline.hardware.effective import apply_threads, emulation_pending

    report = container.core.hardware_report()
    if not report.emulate:
        return
    pending = emulation_pending(report.profile)
    if pending and not os.environ.get(REEXEC_GUARD):
        env = {**os.environ, **pending, REEXEC_GUARD: "1"}
        print(f"emulating {report.target}: restarting with {' '.join(f'{k}={v}' for k, v in pending.items())}",
              file=sys.stderr)
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "qvl_pipeline", *sys.argv[1:]], env)
    apply_threads(report.profile)


def run_task(cfg: DictConfig) -> int:
    """Run the configured task; QvlErrors become a message naming the fix and a non-zero code."""
    from qvl_pipeline.container import make_container

    try:
        config = typed(cfg)
        task = config.task.name
        if task not in TASKS:
            raise ConfigError(f"unknown task {task!r}", f"use task=<one of {', '.join(TASKS)}>")
        container = make_container(config)
        _apply_emulation(container)
        if task == "probe":
            from qvl_pipeline.tasks import probe
            return probe.run(config, container)
        if task == "plan":
            from qvl_pipeline.tasks import plan
            return plan.run(config, container, _results_dir(config))
        if task == "chat":
            from qvl_pipeline.tasks import chat
            return chat.run(config, container, _results_dir(config))
        from qvl_pipeline.tasks import generate
        return generate.run(config, container, _results_dir(config))
    except QvlError as exc:
        print(f"qvl-pipeline: error: {exc}", file=sys.stderr)
        return exc.exit_code


register_schemas()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def _hydra_entry(cfg: DictConfig) -> None:
    code = run_task(cfg)
    if code:
        sys.exit(code)


def main() -> None:
    sys.argv[1:] = open_option_overrides(sys.argv[1:])
    _hydra_entry()


if __name__ == "__main__":
    main()
