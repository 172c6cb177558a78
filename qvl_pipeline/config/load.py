"""Composition outside the CLI (Python API, tests) and the single conversion of config into plain data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qvl_pipeline.config.schema import register_schemas
from qvl_pipeline.errors import ConfigError

CONFIG_MODULE = "qvl_pipeline.conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose the root config with Hydra's compose API, exactly as the CLI would."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    register_schemas()
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            return compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad config or override: {exc}",
                          "check the override's spelling; `python -m qvl_pipeline --help` lists the groups "
                          "and `--cfg job` shows the composed config") from exc


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """OmegaConf -> plain dict (resolved); a missing mandatory value or bad type names its key."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"config value missing or invalid{f' at {key}' if key else ''}: {exc}",
                          "set it on the command line (key=value) or in the group's YAML file") from exc
    assert isinstance(data, dict)
    data.pop("hydra", None)
    return data
