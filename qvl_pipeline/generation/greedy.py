"""Greedy decoding: one prefill, then one-token decode steps over the KV cache."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from qvl_pipeline.errors import InputError
from qvl_pipeline.model.fusion import Fused
from qvl_pipeline.model.qwen3_vl import Qwen3VL
from qvl_pipeline.slots import KVCache, KVCacheBackend


def prefill(model: Qwen3VL, fused: Fused, cache: KVCache) -> torch.Tensor:
    """Run the fused prompt through the decoder, filling `cache`; returns the last position's logits [b, vocab]."""
    logits = model.forward_decoder(fused.inputs_embeds, fused.position_ids, cache, fused.visual_mask,
                                   fused.deepstack, last_only=True)
    return logits[:, -1]


def decode(model: Qwen3VL, token_ids: torch.Tensor, cache: KVCache, rope_delta: torch.Tensor) -> torch.Tensor:
    """Feed token_ids [b] after the cached positions; returns next-token logits [b, vocab]."""
    return model.decode_step(token_ids[:, None], cache, rope_delta)[:, -1]


def greedy_generate(model: Qwen3VL, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                    image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                    video_grid_thw: torch.Tensor | None = None, *, max_new_tokens: int,
                    cache_backend: KVCacheBackend, eos_token_ids: Iterable[int] = ()) -> list[int]:
    """Generate up to `max_new_tokens` tokens by argmax for one prompt (input_ids [s] or [1, s]);
    stops after the first token in `eos_token_ids` (which is included)."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError(f"greedy_generate takes one prompt, got input_ids of shape {list(input_ids.shape)}")
    if max_new_tokens < 1:
        return []
    eos = set(eos_token_ids)
    fused = model.prepare(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    shape = model.cache_shape(batch=1, max_len=input_ids.shape[1] + max_new_tokens)
    cache = cache_backend.create(shape, model.dtype, model.layer_devices())

    logits = prefill(model, fused, cache)                                 # [1, vocab]
    tokens: list[int] = []
    while True:
        token = logits.argmax(-1)                                         # [1]
        tokens.append(int(token))
        if tokens[-1] in eos or len(tokens) == max_new_tokens:
            return tokens
        logits = decode(model, token.to(model.device), cache, fused.rope_delta)
