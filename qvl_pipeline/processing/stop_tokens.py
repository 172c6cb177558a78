"""The ids that end generation: `generation_config.json`'s eos ids, then the tokenizer's eos token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.processing.tokenizer import Tokenizer

GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The parsed `generation_config.json` of a checkpoint folder, or {} when it has none."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})",
                              "restore generation_config.json from the model's repository, or delete it") from exc
    return data if isinstance(data, dict) else {}


def stop_token_ids(generation_config: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    """Every id that ends a reply, in order, without repeats; at least one, else CheckpointError."""
    eos = generation_config.get("eos_token_id")
    ids: list[int] = [eos] if isinstance(eos, int) else [int(i) for i in (eos or [])]
    tokenizer_eos = tokenizer.id_of("eos_token")
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise CheckpointError("neither generation_config.json nor tokenizer_config.json names an end-of-sequence "
                              "token, so generation would never stop",
                              'add "eos_token_id" to generation_config.json (Qwen: <|im_end|>)')
    return unique
