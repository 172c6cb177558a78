"""The whole Qwen3-VL model: vision tower, fusion and decoder, with Hugging Face checkpoint names."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qvl_pipeline.errors import InputError
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.fusion import (
    FeatureCache,
    Fused,
    check_placeholders,
    concat_outputs,
    content_key,
    join_deepstack,
    scatter_features,
    split_output,
)
from qvl_pipeline.model.norms import RMSNorm
from qvl_pipeline.model.positions import decode_position_ids, mrope_position_ids, token_types
from qvl_pipeline.model.text import TextModel
from qvl_pipeline.model.vision import VisionOutput, VisionTower, check_vision_input
from qvl_pipeline.model.vision_blocks import PatchEmbed
from qvl_pipeline.slots import AttentionBackend, CacheShape, KernelsBackend, KVCache, RotaryBackend


def output_head(config: ModelConfig, kernels: KernelsBackend) -> nn.Module | None:
    """The untied `lm_head` [vocab, hidden]; None when the head is tied to the token embedding."""
    text = config.text
    return None if config.tie_word_embeddings else kernels.linear(text.hidden_size, text.vocab_size, False)


class _Body(nn.Module):
    """The checkpoint's `model.` prefix: `visual` and `language_model`."""

    def __init__(self, visual: VisionTower, language_model: TextModel) -> None:
        super().__init__()
        self.visual = visual
        self.language_model = language_model


class Qwen3VL(nn.Module):
    """Qwen3-VL for generation. State-dict names equal those of the Hugging Face checkpoint
    (`model.visual.*`, `model.language_model.*`, and `lm_head.weight` unless the head is tied).

    The three stages are separate calls: `encode_images` (stage 1), `embed_and_fuse` (stage 2) and
    `forward_decoder` (stage 3); `prepare` runs stages 1–2 and skips the vision tower for text-only input.
    """

    def __init__(self, config: ModelConfig, *, visual: VisionTower, language_model: TextModel,
                 lm_head: nn.Module | None, feature_cache: FeatureCache | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = _Body(visual, language_model)
        self.lm_head = lm_head
        self.feature_cache = feature_cache
        self.compute_dtype: torch.dtype | None = None      # set by use_compute_dtype; None: the embeddings' dtype

    @classmethod
    def build(cls, config: ModelConfig, *, attention: AttentionBackend, rotary: RotaryBackend,
              kernels: KernelsBackend, feature_cache: FeatureCache | None = None) -> Qwen3VL:
        """The whole model from one set of slot plugins (the container builds the stages separately)."""
        return cls(config, visual=VisionTower(config.vision, attention=attention, rotary=rotary, kernels=kernels),
                   language_model=TextModel(config.text, attention=attention, rotary=rotary, kernels=kernels),
                   lm_head=output_head(config, kernels), feature_cache=feature_cache)

    # ---- small facts --------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations flow in: the kernels plugin's compute dtype (use_compute_dtype), else that of the
        token embeddings."""
        return self.compute_dtype or self.model.language_model.embed_tokens.weight.dtype

    def use_compute_dtype(self, dtype: torch.dtype) -> None:
        """Let activations (hidden states, the KV cache, the vision tower's) flow in `dtype` when it differs from the
        loaded weights': the norms and the patch embedding, which the activations meet directly and which are small,
        are cast to it; the token embedding table stays as stored (its looked-up rows are cast), so does the vision
        position table (its interpolated rows are cast); the linear layers belong to the kernels plugin, which takes
        activations of its compute dtype. Run once after the kernels plugin's prepare, before placement."""
        if dtype != self.dtype:
            for module in self.modules():
                if isinstance(module, (RMSNorm, nn.LayerNorm, PatchEmbed)):
                    module.to(dtype)
        self.compute_dtype = dtype

    @property
    def device(self) -> torch.device:
        """Where requests start: the token embeddings' device."""
        return self.model.language_model.embed_tokens.weight.device

    def layer_devices(self) -> tuple[torch.device, ...]:
        """The device each decoder layer computes on (where its KV cache belongs)."""
        return tuple(layer.input_layernorm.weight.device for layer in self.model.language_model.layers)

    def cache_shape(self, batch: int, max_len: int) -> CacheShape:
        """The KV cache this model needs for `batch` sequences of up to `max_len` positions."""
        t = self.config.text
        return CacheShape(layers=t.num_hidden_layers, batch=batch, kv_heads=t.num_key_value_heads,
                          head_dim=t.head_dim, max_len=max_len)

    # ---- stage 1 -------------------------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> VisionOutput:
        """pixel_values [patches, C·T·P·P], grid_thw [n, 3] -> VisionOutput (tokens [Σ t·h·w/merge², hidden]).

        Videos go through the same call with their video grids. With a feature cache, images seen before
        are taken from it and only new ones are encoded.
        """
        visual = self.model.visual
        if self.feature_cache is None:
            return visual(pixel_values, grid_thw)
        check_vision_input(self.config.vision, pixel_values, grid_thw)
        grid = grid_thw.cpu()
        pieces = pixel_values.split(grid.prod(-1).tolist())
        keys = [content_key(piece, g) for piece, g in zip(pieces, grid, strict=True)]
        found: list[VisionOutput | None] = [self.feature_cache.get(k) for k in keys]
        missing = [i for i, out in enumerate(found) if out is None]
        if missing:
            fresh = visual(torch.cat([pieces[i] for i in missing]), grid[missing])
            for i, part in zip(missing, split_output(fresh, self.config.vision.merge_unit), strict=True):
                self.feature_cache.put(keys[i], part)
                found[i] = part
        return concat_outputs(found)

    # ---- stage 2 -------------------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [b, s] -> token embeddings [b, s, hidden]."""
        embed = self.model.language_model.embed_tokens
        return embed(input_ids.to(embed.weight.device)).to(self.dtype)

    def embed_and_fuse(self, input_ids: torch.Tensor, images: VisionOutput | None = None,
                       videos: VisionOutput | None = None, image_grid_thw: torch.Tensor | None = None,
                       video_grid_thw: torch.Tensor | None = None) -> Fused:
        """Token embeddings with the visual tokens scattered over their placeholders, MRoPE positions
        (on the CPU), rope deltas and the deepstack layout. Grids default to those of the vision outputs."""
        cfg = self.config
        self._check_ids(input_ids)
        image_grid_thw = images.grid_thw if image_grid_thw is None and images is not None else image_grid_thw
        video_grid_thw = videos.grid_thw if video_grid_thw is None and videos is not None else video_grid_thw
        ids_cpu = input_ids.cpu()
        check_placeholders(ids_cpu == cfg.image_token_id, None if images is None else images.embeds, "image")
        check_placeholders(ids_cpu == cfg.video_token_id, None if videos is None else videos.embeds, "video")
        types = token_types(ids_cpu, cfg.image_token_id, cfg.video_token_id)
        position_ids, rope_delta = mrope_position_ids(
            types, None if image_grid_thw is None else image_grid_thw.cpu(),
            None if video_grid_thw is None else video_grid_thw.cpu(),
            cfg.vision.spatial_merge_size, cfg.text.max_position_embeddings)

        embeds = self.embed(input_ids)                                  # [b, s, hidden]
        image_mask = (input_ids == cfg.image_token_id).to(embeds.device)
        video_mask = (input_ids == cfg.video_token_id).to(embeds.device)
        if images is not None:
            embeds = scatter_features(embeds, image_mask, images.embeds)
        if videos is not None:
            embeds = scatter_features(embeds, video_mask, videos.embeds)
        visual_mask, deepstack = join_deepstack(image_mask, video_mask, images, videos)
        return Fused(inputs_embeds=embeds, position_ids=position_ids, rope_delta=rope_delta,
                     visual_mask=visual_mask, deepstack=deepstack)

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None) -> Fused:
        """Stages 1 and 2 for one request; no vision call when there are no pixels."""
        images = videos = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise InputError("pixel_values were given without image_grid_thw",
                                 "pass the processor's image_grid_thw with the pixels")
            images = self.encode_images(pixel_values, image_grid_thw)
        if pixel_values_videos is not None:
            if video_grid_thw is None:
                raise InputError("pixel_values_videos were given without video_grid_thw",
                                 "pass the processor's video_grid_thw with the pixels")
            videos = self.encode_images(pixel_values_videos, video_grid_thw)
        return self.embed_and_fuse(input_ids, images, videos, image_grid_thw, video_grid_thw)

    # ---- stage 3 -------------------------------------------------------------------------------------------
    def forward_decoder(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor,
                        cache: KVCache | None = None, visual_mask: torch.Tensor | None = None,
                        deepstack: list[torch.Tensor] | None = None, *, last_only: bool = False) -> torch.Tensor:
        """inputs_embeds [b, s, hidden], position_ids [3, b, s] -> logits [b, s, vocab] ([b, 1, vocab] when
        last_only). Appends s positions to `cache` (None: attend within the input only)."""
        hidden = self.model.language_model(inputs_embeds, position_ids, cache, visual_mask, deepstack,
                                           last_only=last_only)
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [..., hidden] -> logits [..., vocab] (tied head: the embedding matrix)."""
        if self.lm_head is None:
            weight = self.model.language_model.embed_tokens.weight
            return F.linear(hidden.to(weight.device, weight.dtype), weight)      # the stored table, never a copy
        return self.lm_head(hidden.to(next(self.lm_head.parameters()).device))

    def decode_step(self, token_ids: torch.Tensor, cache: KVCache, rope_delta: torch.Tensor) -> torch.Tensor:
        """token_ids [b, n] following the cached positions -> logits [b, n, vocab]; advances the cache."""
        positions = decode_position_ids(cache.length, rope_delta, token_ids.shape[1],
                                        self.config.text.max_position_embeddings)
        return self.forward_decoder(self.embed(token_ids), positions, cache)

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, cache: KVCache | None = None, *,
                last_only: bool = False) -> torch.Tensor:
        """One full prefill: input_ids [b, s] (+ pixels) -> logits [b, s, vocab]."""
        fused = self.prepare(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        return self.forward_decoder(fused.inputs_embeds, fused.position_ids, cache, fused.visual_mask,
                                    fused.deepstack, last_only=last_only)

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise InputError(f"input_ids must be integer ids of shape [batch, seq], got "
                             f"{input_ids.dtype} {list(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise InputError("input_ids is empty", "pass at least one prompt token")
        low, high = int(input_ids.min()), int(input_ids.max())
        vocab = self.config.text.vocab_size
        if low < 0 or high >= vocab:
            raise InputError(f"token ids span [{low}, {high}] but the vocabulary has {vocab} entries",
                             "use the checkpoint's own tokenizer")


def skeleton(config: ModelConfig) -> Qwen3VL:
    """The model on the meta device with the slots' plain interfaces: checkpoint names and shapes, no memory."""
    from qvl_pipeline.facts import RunFacts

    facts = RunFacts.example()
    with torch.device("meta"):
        return Qwen3VL.build(config, attention=AttentionBackend(facts), rotary=RotaryBackend(facts),
                             kernels=KernelsBackend(facts))
