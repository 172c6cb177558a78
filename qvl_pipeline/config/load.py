"""Composition outside the CLI (Python API, tests) and the one conversion of the composed config into the typed
RootConfig object that travels down to the components."""

from __future__ import annotations

import re
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qvl_pipeline.config.schema import RootConfig, register_schemas
from qvl_pipeline.errors import ConfigError

CONFIG_MODULE = "qvl_pipeline.conf"
_SLOT = "(attention|rotary|kernels|memory|kv_cache)"
_OPEN_KEYS = re.compile(rf"^({_SLOT}\.options\.[A-Za-z_]\w*\.[A-Za-z_]\w*|hardware\.chains\.{_SLOT})=")


def open_option_overrides(overrides: Sequence[str]) -> list[str]:
    """Plugin options (`attention.options.chunked.chunk_size=512`, any plugin, built-in or third-party) and a
    profile's per-slot chains (`hardware.chains.attention=[sdpa,eager]`) are open namespaces: such overrides get
    Hydra's add-or-override prefix `++`, so nobody has to type it."""
    return [f"++{o}" if _OPEN_KEYS.match(o) else o for o in overrides]


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
            return compose(config_name="config", overrides=open_option_overrides(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(f"bad config or override: {exc}",
                          "check the override's spelling; `python -m qvl_pipeline --help` lists the groups "
                          "and `--cfg job` shows the composed config") from exc


def typed(cfg: DictConfig) -> RootConfig:
    """The composed config as RootConfig (dataclasses all the way down); a missing or bad value names its key."""
    cfg = cfg.copy()
    with_hydra = "hydra" in cfg
    if with_hydra:
        OmegaConf.set_struct(cfg, False)
        cfg.pop("hydra")
    try:
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", "") or ""
        raise ConfigError(f"config value missing or invalid{f' at {key}' if key else ''}: {exc}",
                          "set it on the command line (key=value) or in the group's YAML file") from exc
    if not isinstance(obj, RootConfig):
        raise ConfigError("the composed config is not a qvl-pipeline config", "compose it from qvl_pipeline.conf")
    return obj


def load_config(overrides: Sequence[str] = ()) -> RootConfig:
    """compose_config + typed: the Python API's way to the same config the CLI builds."""
    return typed(compose_config(overrides))
