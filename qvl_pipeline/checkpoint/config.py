"""What the loader reads from `config.json`: the file itself, the weights' dtype, and embedding tying."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint.files import CONFIG_FILE, check_folder
from qvl_pipeline.checkpoint.jsonfile import read_json
from qvl_pipeline.errors import CheckpointError, ConfigError
from qvl_pipeline.model.config import ModelConfig

_RESTORE = "restore config.json from the model's original repository"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def read_config(folder: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a checkpoint folder."""
    path = check_folder(folder) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint folder {path.parent} has no {CONFIG_FILE}",
                              "copy config.json from the model's original repository into the folder")
    config = read_json(path, _RESTORE)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object", _RESTORE)
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise CheckpointError(f"{path}: text_config must be a JSON object, got {type(text).__name__}", _RESTORE)
    return config


def model_config_from_dict(data: Mapping[str, Any], source: str | Path) -> ModelConfig:
    """The model's shape from the parsed `config.json` at `source`; any wrong or inconsistent value raises one
    CheckpointError naming the file, the field and the fix."""
    try:
        return ModelConfig.from_hf_dict(data)
    except ConfigError as exc:
        detail = exc.message.removeprefix("model config: ")
        raise CheckpointError(f"{source} does not describe a model this pipeline can build: {detail}",
                              exc.hint or _RESTORE) from exc


def read_model_config(folder: str | Path) -> ModelConfig:
    """The model's shape from a checkpoint folder's `config.json` (see `model_config_from_dict`)."""
    return model_config_from_dict(read_config(folder), check_folder(folder) / CONFIG_FILE)


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch floating dtype from its name ("bfloat16", "torch.float16", "fp32", ...) or itself."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r}", f"use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def _text(config: Mapping[str, Any]) -> Mapping[str, Any]:
    text = config.get("text_config") or {}
    if not isinstance(text, Mapping):
        raise CheckpointError(f"config.json: text_config must be a JSON object, got {type(text).__name__}", _RESTORE)
    return text


def config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype `config.json` declares (`dtype` or the older `torch_dtype`, top level or text_config)."""
    text = _text(config)
    for source in (config, text):
        for key in ("dtype", "torch_dtype"):
            value = source.get(key)
            if value and value != "auto":
                try:
                    return parse_dtype(value)
                except ConfigError as exc:
                    raise CheckpointError(f"config.json declares {key}={value!r}, which is not a float dtype",
                                          "set it to bfloat16, float16 or float32") from exc
    return None


def resolve_dtype(config: Mapping[str, Any], override: str | torch.dtype | None = None) -> torch.dtype | None:
    """The dtype to load floating weights in: the override, else the config's; None keeps them as stored."""
    if override is not None and override != "auto":
        return parse_dtype(override)
    return config_dtype(config)


def ties_word_embeddings(config: Mapping[str, Any]) -> bool:
    """True when the output head shares the input embedding's weight (and the checkpoint may omit it)."""
    value = config.get("tie_word_embeddings", _text(config).get("tie_word_embeddings", False))
    if not isinstance(value, bool):
        raise CheckpointError(f"config.json: tie_word_embeddings must be true or false, got {value!r}",
                              "write it without quotes (true or false), or restore config.json from the model's "
                              "repository")
    return value
