"""Stage 2: fusing visual tokens into the text stream (placeholder checks, scatter, deepstack layout) and
the per-image feature cache."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import torch

from qvl_pipeline.errors import InputError
from qvl_pipeline.model.vision import VisionOutput


@dataclass
class Fused:
    """What the decoder's prefill needs.

    inputs_embeds [b, s, hidden]; position_ids [3, b, s] (T, H, W); rope_delta [b] (decode position =
    cache length + rope_delta); visual_mask [b, s] bool or None (text only); deepstack: one
    [visual tokens, hidden] per tap, in visual_mask order, or None.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    rope_delta: torch.Tensor
    visual_mask: torch.Tensor | None = None
    deepstack: list[torch.Tensor] | None = None


def check_placeholders(mask: torch.Tensor, features: torch.Tensor | None, kind: str) -> None:
    """Raise InputError unless the number of placeholder tokens equals the number of feature rows."""
    n_tokens = int(mask.sum())
    n_features = 0 if features is None else features.shape[0]
    if n_tokens != n_features:
        raise InputError(
            f"the prompt has {n_tokens} {kind} placeholder tokens but the {kind} encoder produced "
            f"{n_features} {kind} features",
            f"build the prompt with the processor so each {kind} gets t·h·w / merge² placeholder tokens, "
            f"and pass the matching pixel values and grids")


def scatter_features(embeds: torch.Tensor, mask: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """embeds [b, s, hidden] with rows where mask [b, s] replaced by features [n, hidden], in row-major order."""
    return embeds.masked_scatter(mask[..., None], features.to(embeds.device, embeds.dtype))


def join_deepstack(image_mask: torch.Tensor | None, video_mask: torch.Tensor | None,
                   images: VisionOutput | None, videos: VisionOutput | None,
                   ) -> tuple[torch.Tensor | None, list[torch.Tensor] | None]:
    """The visual mask [b, s] (image or video placeholders) and the deepstack features laid out in its order:
    each tap's image rows where the image placeholders are, video rows where the video placeholders are."""
    if images is None and videos is None:
        return None, None
    if videos is None:
        return image_mask, list(images.deepstack)
    if images is None:
        return video_mask, list(videos.deepstack)
    visual = image_mask | video_mask
    is_image = image_mask[visual]                         # [visual tokens] bool
    joined = []
    for img, vid in zip(images.deepstack, videos.deepstack, strict=True):
        out = img.new_zeros(is_image.shape[0], img.shape[-1])
        out[is_image.to(out.device)] = img
        out[~is_image.to(out.device)] = vid.to(out.dtype)
        joined.append(out)
    return visual, joined


# ---- per-image cache -------------------------------------------------------------------------------------
def split_output(out: VisionOutput, merge_unit: int) -> list[VisionOutput]:
    """One VisionOutput per image/video of `out`."""
    sizes = out.token_counts(merge_unit)
    embeds = out.embeds.split(sizes)
    taps = [feat.split(sizes) for feat in out.deepstack]
    return [VisionOutput(embeds=embeds[i], deepstack=[tap[i] for tap in taps], grid_thw=out.grid_thw[i:i + 1])
            for i in range(len(sizes))]


def concat_outputs(parts: list[VisionOutput]) -> VisionOutput:
    """Inverse of split_output."""
    taps = len(parts[0].deepstack)
    return VisionOutput(embeds=torch.cat([p.embeds for p in parts]),
                        deepstack=[torch.cat([p.deepstack[k] for p in parts]) for k in range(taps)],
                        grid_thw=torch.cat([p.grid_thw for p in parts]))


def content_key(pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> str:
    """sha256 of one image's pixel values (dtype, shape and bytes) and its grid."""
    digest = hashlib.sha256()
    grid = [int(v) for v in grid_thw.reshape(-1).tolist()]
    digest.update(f"{pixel_values.dtype}|{list(pixel_values.shape)}|{grid}".encode())
    raw = pixel_values.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


class FeatureCache:
    """LRU of encoded images keyed by content, so a later turn about the same image skips the vision tower."""

    def __init__(self, max_entries: int = 16) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, VisionOutput] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> VisionOutput | None:
        out = self._entries.get(key)
        if out is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return out

    def put(self, key: str, out: VisionOutput) -> None:
        self._entries[key] = out
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
