"""How many bytes each part of a Qwen3-VL model takes in the weight format a kernels plugin produces (pure).

The memory planner sizes placements with these numbers before anything is loaded; after loading it uses the real
module sizes. A kernels plugin says how it stores weights through `KernelsBackend.weight_format`; the built-in
plugins' formats are described here by name (`builtin_format`), and an unknown plugin is assumed to keep the
checkpoint's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

FLOAT_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
INT8_SCALE_BYTES = 4          # Int8Linear: one fp32 scale per output row
INT4_SCALE_ZERO_BYTES = 4     # Int4Linear: a bf16 scale and a bf16 zero per group of inputs per output row


@dataclass(frozen=True)
class Coding:
    """How one linear weight [out, in] is stored: floats of `float_bytes`, int8 rows with a scale, or int4 groups
    of `group` inputs with a scale and zero each (int8 where `in` is not a multiple of the group, as Int4 does)."""

    kind: str                 # float | int8 | int4
    float_bytes: int = 2      # float: bytes per element
    group: int = 32           # int4: inputs per scale/zero pair

    def linear_bytes(self, out_features: int, in_features: int) -> int:
        if self.kind == "float":
            return out_features * in_features * self.float_bytes
        if self.kind == "int8" or in_features % self.group:
            return out_features * in_features + INT8_SCALE_BYTES * out_features
        return out_features * in_features // 2 + (in_features // self.group) * out_features * INT4_SCALE_ZERO_BYTES

    def label(self) -> str:
        if self.kind == "float":
            return {4: "fp32", 2: "16-bit"}.get(self.float_bytes, f"{self.float_bytes}-byte")
        return "int8" if self.kind == "int8" else f"int4 g{self.group}"


def float_coding(dtype: str) -> Coding:
    return Coding("float", FLOAT_BYTES[dtype])


@dataclass(frozen=True)
class WeightFormat:
    """Bytes of the weights as the kernels plugin leaves them: decoder linears in `linear`, the vision tower's in
    `vision` (None: `linear`), the output head in `head` (a quantised head is its own copy even when tied to the
    embedding), everything else (embeddings, norms, biases, the patch convolution, the position table) in floats of
    `other_bytes`."""

    name: str
    linear: Coding
    head: Coding
    other_bytes: int
    # The big tensors are used straight from files (memory-mapped checkpoint or quantised cache) rather than
    # converted in memory, so a memory plan may leave them on disk and read them when used.
    file_backed: bool = True
    vision: Coding | None = None

    @classmethod
    def stored(cls, dtype: str) -> WeightFormat:
        """Every weight in the checkpoint's dtype, as loaded (torch_native and any plugin that does not say)."""
        return cls(dtype, float_coding(dtype), float_coding(dtype), FLOAT_BYTES[dtype])

    @property
    def quantised_head(self) -> bool:
        return self.head.kind != "float"


# int4_weight_only's defaults (its options take them from here, so the planner's suggestion is the plugin's format).
# The head is int4 too: with least-squares refitted groups, 2B random weights, 3 prompts, first-token logits against
# opt=minimal: int4 head 0.612 rel. error vs int8 head 0.610 (min–max groups: 0.659 / 0.654), for 1.076 instead of
# 1.193 GB read per token.
INT4_GROUP = 32
INT4_HEAD_BITS = 4
# The vision tower's linears stay int8 under int4_weight_only: the tower runs once per image, compute bound, and the
# int8 x int8 GEMM is ~2x the int4 one (1262 vs ~620 GOPS at 2B shapes); in the kit's runs opt=aggressive's vision
# took 0.85-0.96 s against opt=moderate's 0.69-0.78 s. It costs ~0.2 GB more RSS at 2B and reads nothing in decode.
INT4_VISION_BITS = 8


def int8_suggestion(stored_dtype: str) -> WeightFormat:
    """int8_weight_only with its defaults (int8 head, weights cached on disk)."""
    return WeightFormat("int8", Coding("int8"), Coding("int8"), FLOAT_BYTES[stored_dtype])


def int4_suggestion(stored_dtype: str, group: int = INT4_GROUP, head_bits: int = INT4_HEAD_BITS,
                    vision_bits: int = INT4_VISION_BITS) -> WeightFormat:
    """int4_weight_only with its defaults (group 32, int4 head, int8 vision tower, weights cached on disk)."""
    four = Coding("int4", group=group)
    head = Coding("int8") if head_bits == 8 else four
    vision = Coding("int8") if vision_bits == 8 else four
    name = f"int4 g{group}" + (", int8 vision" if vision_bits == 8 else "")
    return WeightFormat(name, four, head, FLOAT_BYTES[stored_dtype], vision=vision)


def builtin_format(kernels: str, options: Any, stored_dtype: str) -> WeightFormat:
    """The weight format of a built-in kernels plugin with its options, for a checkpoint stored as `stored_dtype`."""
    stored = WeightFormat.stored(stored_dtype)
    if kernels == "fp32_compute":
        return replace(WeightFormat.stored("float32"), file_backed=stored_dtype == "float32")
    if kernels == "fp16_store":
        half = float_coding("float16")
        return WeightFormat("fp16 linears", half, half, stored.other_bytes, file_backed=stored_dtype == "float16")
    if kernels in ("int8_weight_only", "int8_dynamic"):          # the same stored weights, other decode kernels
        fmt = int8_suggestion(stored_dtype)
        return replace(fmt, head=fmt.head if options.quantize_head else stored.head, file_backed=options.cache)
    if kernels == "int4_weight_only":
        return replace(int4_suggestion(stored_dtype, options.group_size, options.head_bits, options.vision_bits),
                       file_backed=options.cache)
    return stored


@dataclass(frozen=True)
class PartSizes:
    """Bytes of each part of the model in one weight format."""

    vision: int                 # the whole vision tower
    vision_block: int           # one of its transformer blocks (the unit it streams in)
    vision_depth: int
    embed: int                  # the token embedding table
    layer: int                  # one decoder layer
    layers: int                 # how many decoder layers
    head: int                   # the output head; 0 when it is the embedding table itself (tied, not quantised)
    norm: int                   # the final norm

    @property
    def vision_rest(self) -> int:
        """The vision tower outside its blocks: patch embedding, position table, mergers."""
        return self.vision - self.vision_block * self.vision_depth

    @property
    def total(self) -> int:
        return self.vision + self.embed + self.layer * self.layers + self.head + self.norm


def _text_layer(t: Mapping[str, Any], fmt: WeightFormat) -> int:
    d, inter, heads = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or d // heads
    lin = fmt.linear.linear_bytes
    linears = lin(heads * hd, d) + 2 * lin(kv * hd, d) + lin(d, heads * hd) + 2 * lin(inter, d) + lin(d, inter)
    bias = (heads * hd + 2 * kv * hd + d) if t.get("attention_bias") else 0
    return linears + (bias + 2 * d + 2 * hd) * fmt.other_bytes


def _vision(v: Mapping[str, Any], fmt: WeightFormat) -> tuple[int, int]:
    """(the whole tower, one block) in bytes."""
    h, ffn, out = v["hidden_size"], v["intermediate_size"], v["out_hidden_size"]
    patch, temporal, channels = v.get("patch_size", 16), v.get("temporal_patch_size", 2), v.get("in_channels", 3)
    merge = v.get("spatial_merge_size", 2)
    merged = h * merge * merge
    lin, other = (fmt.vision or fmt.linear).linear_bytes, fmt.other_bytes
    block = lin(3 * h, h) + lin(h, h) + lin(ffn, h) + lin(h, ffn) + (3 * h + h + ffn + h + 4 * h) * other
    mlp = lin(merged, merged) + lin(out, merged) + (merged + out) * other
    rest = (channels * temporal * patch * patch * h + h + v.get("num_position_embeddings", 2304) * h) * other
    rest += 2 * h * other + mlp                                                   # the final merger
    rest += len(v.get("deepstack_visual_indexes", ())) * (2 * merged * other + mlp)  # deepstack mergers
    return rest + v["depth"] * block, block


def part_sizes(hf_config: Mapping[str, Any], fmt: WeightFormat) -> PartSizes:
    """Per-part bytes of the model a Hugging Face Qwen3-VL config describes, in `fmt`."""
    t, v = hf_config["text_config"], hf_config["vision_config"]
    d, vocab = t["hidden_size"], t["vocab_size"]
    tied = bool(hf_config.get("tie_word_embeddings", t.get("tie_word_embeddings", False)))
    head = fmt.head.linear_bytes(vocab, d) if (fmt.quantised_head or not tied) else 0
    vision, block = _vision(v, fmt)
    return PartSizes(vision=vision, vision_block=block, vision_depth=v["depth"], embed=vocab * d * fmt.other_bytes,
                     layer=_text_layer(t, fmt), layers=t["num_hidden_layers"], head=head, norm=d * fmt.other_bytes)


def kv_bytes_per_position(hf_config: Mapping[str, Any], element_bytes: int) -> int:
    """Keys and values of ONE decoder layer for one position."""
    t = hf_config["text_config"]
    heads = t["num_attention_heads"]
    kv = t.get("num_key_value_heads") or heads
    hd = t.get("head_dim") or t["hidden_size"] // heads
    return 2 * kv * hd * element_bytes
