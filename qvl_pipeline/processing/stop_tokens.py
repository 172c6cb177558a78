"""The ids that end generation: `generation_config.json`'s eos ids, then the tokenizer's eos token."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qvl_pipeline.checkpoint.jsonfile import read_json
from qvl_pipeline.errors import CheckpointError
from qvl_pipeline.processing.tokenizer import Tokenizer

GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """The parsed `generation_config.json` of a checkpoint folder, or {} when it has none."""
    path = Path(folder) / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    data = read_json(path, "restore generation_config.json from the model's repository, or delete it")
    return data if isinstance(data, dict) else {}


def stop_token_ids(generation_config: dict[str, Any], tokenizer: Tokenizer) -> list[int]:
    """Every id that ends a reply, in order, without repeats; at least one, else CheckpointError."""
    eos = generation_config.get("eos_token_id")
    ids: list[int] = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(type(i) is int and 0 <= i < tokenizer.vocab_size for i in ids):
        raise CheckpointError(f"{GENERATION_CONFIG_FILE}: eos_token_id must be a token id or a list of token ids "
                              f"below the vocabulary size {tokenizer.vocab_size}, got {eos!r}",
                              f"restore {GENERATION_CONFIG_FILE} from the model's repository, or delete it")
    tokenizer_eos = tokenizer.id_of("eos_token")
    if tokenizer_eos is not None:
        ids.append(tokenizer_eos)
    unique = list(dict.fromkeys(ids))
    if not unique:
        raise CheckpointError("neither generation_config.json nor tokenizer_config.json names an end-of-sequence "
                              "token, so generation would never stop",
                              'add "eos_token_id" to generation_config.json (Qwen: <|im_end|>)')
    return unique
