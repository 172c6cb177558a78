"""Write a random checkpoint of a preset's shape one shard at a time, so a model larger than this machine's RAM (an
8B-shaped one: 17.5 GB in bf16) is written with one shard in memory.

`python -m qvl_pipeline.bench.sharded_checkpoint --model qwen3_vl_8b --folder /tmp/qvl-8b` (std 0.02 weights, unit
norms, zero biases; the demo tokenizer and processor configs, whose token ids replace the real ones).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from qvl_pipeline.bench.random_checkpoint import preset_config, random_tensor
from qvl_pipeline.checkpoint.files import INDEX_FILE
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import skeleton
from qvl_pipeline.processing.demo_assets import write_demo_processor_configs, write_demo_tokenizer

SHARD_BYTES = 2 * 10**9


def write_sharded(folder: Path, model: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                  shard_bytes: int = SHARD_BYTES) -> Path:
    """The folder (kept as it is when config.json exists): config.json, shards with their index, tokenizer."""
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = preset_config(model)
    config["dtype"] = str(dtype).removeprefix("torch.")
    shapes = skeleton(ModelConfig.from_hf_dict(config)).state_dict()
    if config.get("tie_word_embeddings"):
        shapes.pop("lm_head.weight", None)
    element = torch.empty(0, dtype=dtype).element_size()
    shards: list[list[str]] = [[]]
    size = 0
    for name, meta in shapes.items():
        nbytes = meta.numel() * element
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for k, names in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        state = {}
        for name in names:
            state[name] = random_tensor(name, shapes[name], dtype, gen)
            weight_map[name] = file
            total += state[name].numel() * element
        save_file(state, str(folder / file), metadata={"format": "pt"})
        del state
        print(f"  wrote {file}", file=sys.stderr)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
    ids = write_demo_tokenizer(folder)
    write_demo_processor_configs(folder)
    config.update(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qvl_pipeline.bench.sharded_checkpoint", description=__doc__)
    parser.add_argument("--model", default="qwen3_vl_8b")
    parser.add_argument("--folder", type=Path, required=True)
    args = parser.parse_args(argv)
    print(write_sharded(args.folder, args.model))
    return 0


if __name__ == "__main__":
    sys.exit(main())
