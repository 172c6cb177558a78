"""Tiny Qwen3-VL configs, inputs and oracle/ours model pairs for the model tests."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch

from qvl_pipeline.facts import RunFacts
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import Qwen3VL
from qvl_plugins.attention.eager import EagerAttention
from qvl_plugins.attention.sdpa import SdpaAttention
from qvl_plugins.kernels.torch_native import TorchNativeKernels
from qvl_plugins.rotary.reference import ReferenceRotary

IMAGE, VIDEO, START, END = 250, 251, 252, 253
VOCAB = 256
TEXT_IDS = 240          # ordinary text tokens are drawn from [0, TEXT_IDS)
PATCH, MERGE, TEMPORAL = 16, 2, 2

# Facts for plugins that do not depend on the model (the KV-cache backends); our_model gives its plugins facts of
# the model it builds.
FACTS = RunFacts.example()
ATTENTION = {"eager": EagerAttention, "sdpa": SdpaAttention}


def tiny_hf_dict(*, tied: bool = False, taps: tuple[int, ...] = (0, 2), text_layers: int = 3,
                 vision_depth: int = 3, init: float = 0.02, max_positions: int = 512) -> dict[str, Any]:
    """A Hugging Face Qwen3-VL config dict with tiny sizes (new rope_parameters spelling)."""
    return {
        "model_type": "qwen3_vl",
        "text_config": {
            "vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "max_position_embeddings": max_positions, "rms_norm_eps": 1e-6, "initializer_range": init,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
        },
        "vision_config": {
            "depth": vision_depth, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2,
            "out_hidden_size": 64, "num_position_embeddings": 64, "deepstack_visual_indexes": list(taps),
            "patch_size": PATCH, "spatial_merge_size": MERGE, "temporal_patch_size": TEMPORAL,
            "initializer_range": init,
        },
        "image_token_id": IMAGE, "video_token_id": VIDEO, "vision_start_token_id": START,
        "vision_end_token_id": END, "tie_word_embeddings": tied,
    }


def old_spelling(hf: dict[str, Any]) -> dict[str, Any]:
    """The same config in the released checkpoints' spelling (rope_theta + rope_scaling, tie in text_config)."""
    d = copy.deepcopy(hf)
    rope = d["text_config"].pop("rope_parameters")
    d["text_config"]["rope_theta"] = rope.pop("rope_theta")
    d["text_config"]["rope_scaling"] = rope
    d["text_config"]["tie_word_embeddings"] = d["tie_word_embeddings"]
    d["vision_config"]["model_type"] = "qwen3_vl"
    return d


def hf_model(hf: dict[str, Any], seed: int = 0, attn: str = "eager"):
    """The oracle, with random weights drawn from `seed`."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration._from_config(Qwen3VLConfig(**copy.deepcopy(hf)),
                                                         attn_implementation=attn)
    return model.eval()


def model_facts(hf: dict[str, Any]) -> RunFacts:
    """RunFacts of a plain CPU machine running the model `hf` in fp32."""
    return RunFacts.example(hf_config=hf)


def our_model(hf: dict[str, Any], attention: str = "eager", **kwargs: Any) -> Qwen3VL:
    facts = model_facts(hf)
    return Qwen3VL.build(ModelConfig.from_hf_dict(hf), attention=ATTENTION[attention](facts),
                         rotary=ReferenceRotary(facts), kernels=TorchNativeKernels(facts), **kwargs).eval()


def checkpoint_state(oracle, tied: bool) -> dict[str, torch.Tensor]:
    """The oracle's weights as a checkpoint holds them (a tied head is not stored)."""
    state = dict(oracle.state_dict())
    if tied:
        state.pop("lm_head.weight")
    return state


def pair(hf: dict[str, Any], seed: int = 0, attention: str = "eager"):
    """(oracle, ours) with the same weights; ours loaded with strict=True."""
    oracle = hf_model(hf, seed)
    ours = our_model(hf, attention)
    ours.load_state_dict(checkpoint_state(oracle, hf["tie_word_embeddings"]), strict=True)
    return oracle, ours


# ---- inputs -------------------------------------------------------------------------------------------------
def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    min_pixels=32 * 32 * 2, max_pixels=32 * 32 * 12)


def images(sizes: list[tuple[int, int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random RGB images of (height, width) through the reference processor -> (pixel_values, grid_thw)."""
    rng = np.random.default_rng(seed)
    pics = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    out = image_processor()(images=pics, return_tensors="pt")
    return out["pixel_values"].float(), out["image_grid_thw"]


def video(t: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random video patches for a (t, h, w) patch grid -> (pixel_values_videos, video_grid_thw)."""
    g = torch.Generator().manual_seed(seed)
    patches = torch.rand(t * h * w, 3 * TEMPORAL * PATCH * PATCH, generator=g) * 2 - 1
    return patches, torch.tensor([[t, h, w]])


def text(n: int, g: torch.Generator) -> list[int]:
    return torch.randint(0, TEXT_IDS, (n,), generator=g).tolist()


def prompt(image_grids: torch.Tensor | None = None, video_grids: torch.Tensor | None = None,
           seed: int = 0, video_first: bool = False) -> torch.Tensor:
    """[1, s] ids: text, each image as start + pads + end between text, each video frame after a timestamp."""
    g = torch.Generator().manual_seed(seed)
    ids = text(5, g)
    image_parts, video_parts = [], []
    if image_grids is not None:
        for t, h, w in image_grids.tolist():
            image_parts.append([START] + [IMAGE] * (t * h * w // MERGE ** 2) + [END] + text(3, g))
    if video_grids is not None:
        for t, h, w in video_grids.tolist():
            frames = [tok for _ in range(t) for tok in [*text(2, g), START, *[VIDEO] * (h * w // MERGE ** 2), END]]
            video_parts.append([START, *frames, END, *text(2, g)])
    for part in (video_parts + image_parts if video_first else image_parts + video_parts):
        ids += part
    ids += text(4, g)
    return torch.tensor([ids])


def mm_token_types(ids: torch.Tensor) -> torch.Tensor:
    """The oracle's token-type row (text 0, image 1, video 2)."""
    return (ids == IMAGE).long() + 2 * (ids == VIDEO).long()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max(1, max |b|)."""
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))
