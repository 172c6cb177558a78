"""Write a random checkpoint of a preset's real shape to disk (for load and speed measurements)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint import save_checkpoint
from qvl_pipeline.config.load import load_config
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import skeleton
from qvl_pipeline.processing.demo_assets import write_demo_processor_configs, write_demo_tokenizer


def preset_config(model: str) -> dict[str, Any]:
    return dict(load_config([f"model={model}"]).model.hf_config)


def write_random_checkpoint(folder: Path, model: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> Path:
    """A folder with config.json, sharded random weights (std 0.02), the demo tokenizer and processor configs."""
    if (folder / "config.json").exists():
        return folder
    config = preset_config(model)
    config["dtype"] = str(dtype).removeprefix("torch.")
    shapes = skeleton(ModelConfig.from_hf_dict(config)).state_dict()
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in shapes.items():
        if name.endswith("bias"):
            state[name] = torch.zeros(meta.shape, dtype=dtype)
        elif meta.dim() == 1:
            state[name] = torch.ones(meta.shape, dtype=dtype)
        else:
            state[name] = (torch.randn(meta.shape, generator=gen) * 0.02).to(dtype)
    save_checkpoint(folder, state, config, max_shard_size="2GB")
    ids = write_demo_tokenizer(folder)
    write_demo_processor_configs(folder)
    # Token ids of the demo tokenizer replace the real ones so prompts work with the bundled tokenizer.
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
