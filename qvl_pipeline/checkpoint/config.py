"""What the loader reads from `config.json`: the file itself, the weights' dtype, and embedding tying."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint.files import CONFIG_FILE, check_folder
from qvl_pipeline.errors import CheckpointError, ConfigError

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
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})",
                              "restore config.json from the model's original repository") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} does not hold a JSON object",
                              "restore config.json from the model's original repository")
    return config


def parse_dtype(value: str | torch.dtype) -> torch.dtype:
    """A torch floating dtype from its name ("bfloat16", "torch.float16", "fp32", ...) or itself."""
    if isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in DTYPES:
        raise ConfigError(f"unknown dtype {value!r}", f"use one of {', '.join(sorted(DTYPES))}")
    return DTYPES[key]


def config_dtype(config: Mapping[str, Any]) -> torch.dtype | None:
    """The dtype `config.json` declares (`dtype` or the older `torch_dtype`, top level or text_config)."""
    text = config.get("text_config") or {}
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
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
