"""A random checkpoint of a model preset's real shape, written once into the cache folder (for load and speed
measurements: speed and memory are real, the words are not)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint import save_checkpoint
from qvl_pipeline.config.load import load_config
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import skeleton
from qvl_pipeline.processing.demo_assets import write_demo_processor_configs, write_demo_tokenizer
from qvl_pipeline.runtime.demo import cache_root

RANDOM_CHECKPOINT_VERSION = 2
SHARD_SIZE = "2GB"


def preset_config(model: str) -> dict[str, Any]:
    """The Hugging Face config of a model preset (qvl_pipeline/conf/model/<model>.yaml)."""
    return copy.deepcopy(dict(load_config([f"model={model}"]).model.hf_config))


def random_checkpoint_folder(model: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """Where the random checkpoint of `model`'s shape lives: <cache>/bench/<model>-<hash of shape, dtype, seed>."""
    blob = json.dumps({"config": preset_config(model), "dtype": str(dtype), "seed": seed,
                       "version": RANDOM_CHECKPOINT_VERSION}, sort_keys=True)
    return cache_root() / "bench" / f"{model}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def random_tensor(name: str, meta: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """One random weight shaped like `meta`: N(0, 0.02) for a matrix, ones for a norm, zeros for a bias."""
    if name.endswith("bias"):
        return torch.zeros(meta.shape, dtype=dtype)
    if meta.dim() == 1:
        return torch.ones(meta.shape, dtype=dtype)
    return (torch.randn(meta.shape, generator=gen) * 0.02).to(dtype)


def random_state(config: dict[str, Any], dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    """Weights for every tensor of the model `config` describes (see random_tensor)."""
    shapes = skeleton(ModelConfig.from_hf_dict(config)).state_dict()
    gen = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, meta, dtype, gen) for name, meta in shapes.items()}


def write_random_checkpoint(folder: Path, model: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """`folder` holding config.json, sharded random weights, the demo tokenizer and processor configs; written
    once (into a staging folder renamed into place when complete), returned as it is when it exists."""
    if (folder / "config.json").exists():
        return folder
    staging = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ids = write_demo_tokenizer(staging)
        write_demo_processor_configs(staging)
        config = preset_config(model)
        # The demo tokenizer's ids replace the preset's so prompts work with the bundled tokenizer.
        config.update(dtype=str(dtype).removeprefix("torch."), image_token_id=ids["<|image_pad|>"],
                      video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                      vision_end_token_id=ids["<|vision_end|>"])
        vocab = json.loads((staging / "tokenizer.json").read_text(encoding="utf-8"))
        size = len(vocab["model"]["vocab"]) + len(vocab.get("added_tokens", []))
        config["text_config"]["vocab_size"] = max(int(config["text_config"]["vocab_size"]), size)
        config["text_config"]["dtype"] = config["dtype"]
        save_checkpoint(staging, random_state(config, dtype, seed), config, max_shard_size=SHARD_SIZE)
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / "config.json").exists():     # not another process finishing first: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
