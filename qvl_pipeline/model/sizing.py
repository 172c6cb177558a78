"""Parameter counts and weight sizes of a Qwen3-VL model, from its Hugging Face config dict alone."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Bytes per parameter of each weight format the plan reports (int formats include their fp16 scales).
FORMAT_BYTES: dict[str, float] = {
    "float32": 4.0,
    "bfloat16": 2.0,
    "float16": 2.0,
    "int8 (per-channel scales)": 1.0,
    "int4 (group 32 scales)": 0.5 + 2 / 32,
}


@dataclass(frozen=True)
class ParamCounts:
    vision: int
    embed: int
    per_layer: int
    layers: int
    final_norm: int
    head: int            # 0 when tied to the embedding

    @property
    def text(self) -> int:
        return self.embed + self.per_layer * self.layers + self.final_norm + self.head

    @property
    def total(self) -> int:
        return self.vision + self.text

    @property
    def read_per_token(self) -> int:
        """Parameters one decode step reads: every layer, the head (or the tied embedding), one embedding row."""
        head = self.head if self.head else self.embed
        return self.per_layer * self.layers + self.final_norm + head


def _vision_params(v: Mapping[str, Any]) -> int:
    hidden, ffn = v["hidden_size"], v["intermediate_size"]
    patch, temporal, channels = v.get("patch_size", 16), v.get("temporal_patch_size", 2), v.get("in_channels", 3)
    merge = v.get("spatial_merge_size", 2)
    merged = hidden * merge * merge
    out = v["out_hidden_size"]
    patch_embed = channels * temporal * patch * patch * hidden + hidden
    pos_embed = v.get("num_position_embeddings", 2304) * hidden
    block = 2 * 2 * hidden + (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) \
        + (hidden * ffn + ffn) + (ffn * hidden + hidden)
    mlp = (merged * merged + merged) + (merged * out + out)
    merger = 2 * hidden + mlp
    deepstack = len(v.get("deepstack_visual_indexes", ())) * (2 * merged + mlp)
    return patch_embed + pos_embed + v["depth"] * block + merger + deepstack


def count_params(hf_config: Mapping[str, Any]) -> ParamCounts:
    """Exact parameter counts of the model a Hugging Face Qwen3-VL config describes."""
    t, v = hf_config["text_config"], hf_config["vision_config"]
    d, inter, vocab = t["hidden_size"], t["intermediate_size"], t["vocab_size"]
    heads, kv = t["num_attention_heads"], t.get("num_key_value_heads") or t["num_attention_heads"]
    hd = t.get("head_dim") or d // heads
    attn = d * heads * hd + 2 * d * kv * hd + heads * hd * d + 2 * hd
    layer = attn + 3 * d * inter + 2 * d
    tied = bool(hf_config.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    return ParamCounts(vision=_vision_params(v), embed=vocab * d, per_layer=layer,
                       layers=t["num_hidden_layers"], final_norm=d, head=0 if tied else vocab * d)


def weight_bytes(hf_config: Mapping[str, Any], bytes_per_param: float) -> int:
    """Total bytes of all weights stored at `bytes_per_param`."""
    return int(count_params(hf_config).total * bytes_per_param)
