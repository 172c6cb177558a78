"""The model's shape, read from (and written back to) a Hugging Face Qwen3-VL `config.json` dict."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from qvl_pipeline.errors import ConfigError

# Activation names the checkpoints use (Hugging Face ACT2FN spellings) that the model implements.
KNOWN_ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu", "relu")

_TEXT_DEFAULT_THETA = 500000.0     # Qwen3VLTextConfig.default_theta (released checkpoints say 5e6)
_VISION_DEFAULT_THETA = 10000.0
_DEFAULT_MROPE_SECTION = (24, 20, 20)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (ViT with 2D rotary, learned position grid, patch merger and deepstack taps)."""

    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = _VISION_DEFAULT_THETA
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch in `pixel_values`: channels · temporal · patch · patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @property
    def merge_unit(self) -> int:
        """Patches merged into one visual token (merge²)."""
        return self.spatial_merge_size * self.spatial_merge_size

    @property
    def grid_side(self) -> int:
        """Side of the square learned position-embedding grid."""
        return math.isqrt(self.num_position_embeddings)


@dataclass(frozen=True)
class TextConfig:
    """The Qwen3 text decoder with interleaved MRoPE."""

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 128000
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_type: str = "default"
    rope_theta: float = _TEXT_DEFAULT_THETA
    mrope_section: tuple[int, int, int] = _DEFAULT_MROPE_SECTION
    mrope_interleaved: bool = True
    initializer_range: float = 0.02

    @property
    def kv_groups(self) -> int:
        """Query heads served by each key/value head."""
        return self.num_attention_heads // self.num_key_value_heads


@dataclass(frozen=True)
class ModelConfig:
    """A whole Qwen3-VL model: both towers, the special token ids and whether the head is tied."""

    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        _validate(self)

    # ---- reading ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Read a Hugging Face Qwen3-VL config dict (old `rope_scaling` or new `rope_parameters` spelling)."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"model config: expected a mapping, got {type(data).__name__}", _RESTORE)
        text_raw = _sub(data, "text_config")
        vision_raw = _sub(data, "vision_config")
        text = _read_text(text_raw)
        vision = _read_vision(vision_raw)
        tie = data.get("tie_word_embeddings")
        if tie is None:
            tie = _bool(text_raw, "tie_word_embeddings", False, "text_config")
        else:
            tie = _bool(data, "tie_word_embeddings", False, "config")
        return cls(
            text=text, vision=vision,
            image_token_id=_int(data, "image_token_id", 151655, "config"),
            video_token_id=_int(data, "video_token_id", 151656, "config"),
            vision_start_token_id=_int(data, "vision_start_token_id", 151652, "config"),
            vision_end_token_id=_int(data, "vision_end_token_id", 151653, "config"),
            tie_word_embeddings=bool(tie),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a checkpoint's `config.json`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"model config {path} does not exist",
                              "point model.path at a Qwen3-VL checkpoint folder") from None
        except (OSError, ValueError, RecursionError) as exc:   # unreadable, not UTF-8, not JSON, nested too deeply
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ConfigError(f"model config {path} cannot be read: {reason}", _RESTORE) from None
        return cls.from_hf_dict(data)

    # ---- writing ---------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face config dict (new `rope_parameters` spelling) describing the same model."""
        t, v = self.text, self.vision
        text = {f.name: getattr(t, f.name) for f in fields(t)
                if f.name not in ("rope_type", "rope_theta", "mrope_section", "mrope_interleaved")}
        text["rope_parameters"] = {"rope_type": t.rope_type, "rope_theta": t.rope_theta,
                                   "mrope_section": list(t.mrope_section),
                                   "mrope_interleaved": t.mrope_interleaved}
        text["model_type"] = "qwen3_vl_text"
        vision = {f.name: getattr(v, f.name) for f in fields(v) if f.name != "rope_theta"}
        vision["deepstack_visual_indexes"] = list(v.deepstack_visual_indexes)
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rope_theta}
        vision["model_type"] = "qwen3_vl_vision"
        return {
            "architectures": ["Qwen3VLForConditionalGeneration"],
            "model_type": "qwen3_vl",
            "text_config": text,
            "vision_config": vision,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "vision_start_token_id": self.vision_start_token_id,
            "vision_end_token_id": self.vision_end_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


# ---- helpers ---------------------------------------------------------------------------------------------
_RESTORE = "restore config.json from the model's repository"


def _wrong(where: str, key: str, expected: str, value: Any) -> ConfigError:
    """A field of the wrong type: the message names it, the hint says what to write."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    name = key if where == "config" else f"{where}.{key}"
    return ConfigError(f"model config: {name} must be {expected}, got {shown}",
                       f"write {name} as {expected} (no quotes around numbers), or {_RESTORE}")


def _sub(data: Mapping[str, Any], key: str, where: str = "config") -> Mapping[str, Any]:
    raw = data.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _wrong(where, key, "a mapping", raw)
    return raw


def _int(data: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _wrong(where, key, "an integer", value)
    return value


def _float(data: Mapping[str, Any], key: str, default: float, where: str) -> float:
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _wrong(where, key, "a number", value)
    return float(value)


def _bool(data: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _wrong(where, key, "true or false", value)   # "false" as a string would read as True
    return value


def _str(data: Mapping[str, Any], key: str, default: str, where: str) -> str:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _wrong(where, key, "a string", value)
    return value


def _scalar_size(data: Mapping[str, Any], key: str, default: int) -> int:
    """patch_size / temporal_patch_size may be written as [n, n]; only equal sides are supported."""
    value = data.get(key)
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"model config: vision_config.{key}={list(value)} is not square; "
                              f"only equal sizes are supported", f"write vision_config.{key} as one integer")
        value = value[0]
    return _int({key: value}, key, default, "vision_config")


def _read_rope(t: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the new (`rope_parameters`) and old (`rope_theta` + `rope_scaling`) spellings."""
    params = t.get("rope_parameters") or {}
    scaling = t.get("rope_scaling") or {}
    for name, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(value, Mapping):
            raise _wrong("text_config", name, "a mapping", value)
    merged: dict[str, Any] = {}
    for source in (scaling, params):       # the new spelling wins where both are present
        for key, value in source.items():
            merged["rope_type" if key == "type" else key] = value
    if "rope_theta" not in merged and t.get("rope_theta") is not None:
        merged["rope_theta"] = t["rope_theta"]
    return merged


def _read_text(t: Mapping[str, Any]) -> TextConfig:
    w = "text_config"
    rope = _read_rope(t)
    heads = _int(t, "num_attention_heads", 32, w)
    section = rope.get("mrope_section", _DEFAULT_MROPE_SECTION)
    if not (isinstance(section, (list, tuple)) and len(section) == 3
            and all(isinstance(s, int) and not isinstance(s, bool) for s in section)):
        raise _wrong(w, "rope_parameters.mrope_section", "a list of three integers", section)
    return TextConfig(
        vocab_size=_int(t, "vocab_size", 151936, w),
        hidden_size=_int(t, "hidden_size", 4096, w),
        intermediate_size=_int(t, "intermediate_size", 22016, w),
        num_hidden_layers=_int(t, "num_hidden_layers", 32, w),
        num_attention_heads=heads,
        num_key_value_heads=_int(t, "num_key_value_heads", heads, w),
        head_dim=_int(t, "head_dim", 128, w),
        hidden_act=_str(t, "hidden_act", "silu", w),
        max_position_embeddings=_int(t, "max_position_embeddings", 128000, w),
        rms_norm_eps=_float(t, "rms_norm_eps", 1e-6, w),
        attention_bias=_bool(t, "attention_bias", False, w),
        rope_type=_str(rope, "rope_type", "default", w),
        rope_theta=_float(rope, "rope_theta", _TEXT_DEFAULT_THETA, w),
        mrope_section=(section[0], section[1], section[2]),
        mrope_interleaved=_bool(rope, "mrope_interleaved", True, w),
        initializer_range=_float(t, "initializer_range", 0.02, w),
    )


def _read_vision(v: Mapping[str, Any]) -> VisionConfig:
    w = "vision_config"
    rope = _sub(v, "rope_parameters", w)
    taps = v.get("deepstack_visual_indexes", (8, 16, 24))
    if not (isinstance(taps, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in taps)):
        raise _wrong(w, "deepstack_visual_indexes", "a list of integers", taps)
    return VisionConfig(
        depth=_int(v, "depth", 27, w),
        hidden_size=_int(v, "hidden_size", 1152, w),
        hidden_act=_str(v, "hidden_act", "gelu_pytorch_tanh", w),
        intermediate_size=_int(v, "intermediate_size", 4304, w),
        num_heads=_int(v, "num_heads", 16, w),
        in_channels=_int(v, "in_channels", 3, w),
        patch_size=_scalar_size(v, "patch_size", 16),
        spatial_merge_size=_int(v, "spatial_merge_size", 2, w),
        temporal_patch_size=_scalar_size(v, "temporal_patch_size", 2),
        out_hidden_size=_int(v, "out_hidden_size", 3584, w),
        num_position_embeddings=_int(v, "num_position_embeddings", 2304, w),
        deepstack_visual_indexes=tuple(taps),
        rope_theta=_float(rope, "rope_theta", _VISION_DEFAULT_THETA, w),
        initializer_range=_float(v, "initializer_range", 0.02, w),
    )


def _validate(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the numbers for the first inconsistency found."""
    t, v = cfg.text, cfg.vision
    problems: list[str] = []
    for where, obj in (("text_config", t), ("vision_config", v)):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if f.type in ("int",) and value <= 0:
                problems.append(f"{where}.{f.name}={value} must be positive")
    if v.out_hidden_size != t.hidden_size:
        problems.append(f"vision_config.out_hidden_size={v.out_hidden_size} must equal "
                        f"text_config.hidden_size={t.hidden_size} (visual tokens enter the decoder's stream)")
    if v.num_heads > 0 and v.hidden_size % v.num_heads:
        problems.append(f"vision_config.hidden_size={v.hidden_size} is not divisible by num_heads={v.num_heads}")
    elif v.num_heads > 0 and v.head_dim % 4:
        problems.append(f"vision head_dim={v.head_dim} (hidden_size/num_heads) must be divisible by 4 "
                        f"for the 2D rotary")
    if v.grid_side * v.grid_side != v.num_position_embeddings:
        problems.append(f"vision_config.num_position_embeddings={v.num_position_embeddings} is not a square")
    bad_taps = [i for i in v.deepstack_visual_indexes if not 0 <= i < v.depth]
    if bad_taps:
        problems.append(f"vision_config.deepstack_visual_indexes {bad_taps} must lie in [0, depth={v.depth})")
    if len(set(v.deepstack_visual_indexes)) != len(v.deepstack_visual_indexes):
        problems.append(f"vision_config.deepstack_visual_indexes {list(v.deepstack_visual_indexes)} repeat a layer")
    if len(v.deepstack_visual_indexes) > t.num_hidden_layers:
        problems.append(f"{len(v.deepstack_visual_indexes)} deepstack taps need as many decoder layers, but "
                        f"text_config.num_hidden_layers={t.num_hidden_layers}")
    if t.num_key_value_heads > 0 and t.num_attention_heads % t.num_key_value_heads:
        problems.append(f"text_config.num_attention_heads={t.num_attention_heads} is not divisible by "
                        f"num_key_value_heads={t.num_key_value_heads}")
    if t.head_dim % 2:
        problems.append(f"text_config.head_dim={t.head_dim} must be even for rotary embeddings")
    if sum(t.mrope_section) * 2 != t.head_dim or min(t.mrope_section) < 0:
        problems.append(f"text mrope_section {list(t.mrope_section)} sums to {sum(t.mrope_section)} but must "
                        f"sum to head_dim/2={t.head_dim // 2}")
    for name, value in (("text_config.rope_theta", t.rope_theta), ("vision_config.rope_theta", v.rope_theta),
                        ("text_config.rms_norm_eps", t.rms_norm_eps)):
        if not (math.isfinite(value) and value > 0):
            problems.append(f"{name}={value} must be a positive finite number")
    if t.rope_type != "default":
        problems.append(f"text rope_type={t.rope_type!r} is not supported (Qwen3-VL uses 'default' MRoPE)")
    for where, act in (("text_config", t.hidden_act), ("vision_config", v.hidden_act)):
        if act not in KNOWN_ACTIVATIONS:
            problems.append(f"{where}.hidden_act={act!r} is not one of {list(KNOWN_ACTIVATIONS)}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        value = getattr(cfg, name)
        if not 0 <= value < t.vocab_size:
            problems.append(f"{name}={value} lies outside the vocabulary [0, {t.vocab_size})")
    if cfg.image_token_id == cfg.video_token_id:
        problems.append(f"image_token_id and video_token_id are both {cfg.image_token_id}")
    if problems:
        raise ConfigError("model config: " + "; ".join(problems),
                          "use the checkpoint's own config.json, or fix the named fields")
