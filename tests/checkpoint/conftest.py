"""Tiny checkpoints for the loader tests: a stand-in module with checkpoint names, and its state dict."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
import torch
from torch import nn

# Names and shapes of a (very) small Qwen3-VL-like checkpoint; enough to exercise shards and tying.
SHAPES: dict[str, tuple[int, ...]] = {
    "model.visual.patch_embed.proj.weight": (8, 3, 2, 4, 4),
    "model.visual.patch_embed.proj.bias": (8,),
    "model.visual.blocks.0.attn.qkv.weight": (24, 8),
    "model.visual.blocks.0.attn.qkv.bias": (24,),
    "model.language_model.embed_tokens.weight": (32, 8),
    "model.language_model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.language_model.layers.0.mlp.gate_proj.weight": (16, 8),
    "model.language_model.norm.weight": (8,),
    "lm_head.weight": (32, 8),
}


def _module_like(shapes: Mapping[str, tuple[int, ...]], *, device: str = "cpu") -> nn.Module:
    """An nn.Module tree whose state-dict names and shapes are exactly `shapes` (values zero)."""
    root = nn.Module()
    for name, shape in shapes.items():
        owner = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape, device=device)))
    return root


def _random_state(shapes: Mapping[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}


def _tiny_config(tie: bool = False, **extra: object) -> dict[str, object]:
    return {"model_type": "qwen3_vl", "tie_word_embeddings": tie, "text_config": {"hidden_size": 8}, **extra}


@pytest.fixture
def shapes() -> dict[str, tuple[int, ...]]:
    return dict(SHAPES)


@pytest.fixture
def state(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return _random_state(shapes)


@pytest.fixture
def module_like():
    """Factory: module_like(shapes, device="cpu") -> a zero module with those state-dict names."""
    return _module_like


@pytest.fixture
def tiny_config():
    """Factory: tiny_config(tie=False, **extra) -> a config.json dict."""
    return _tiny_config
