"""RunFacts: what resolution validates against — the machine, the model that will really be loaded, its weight
bytes, and the context a request may use. Gathered once, before any plugin is chosen."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qvl_pipeline.hardware.profile import CpuFacts, HardwareProfile, StorageFacts
from qvl_pipeline.memory_plan import Budgets, derive_budgets
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.sizing import ParamCounts, count_params
from qvl_pipeline.weight_format import PartSizes, WeightFormat, part_sizes

GIB = 1024 ** 3
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}
# Share of the RAM left after the weights that a KV cache may grow into when no budget or override applies.
KV_RAM_SHARE = 0.25
# A context is never budgeted below this many positions (a one-image prompt plus an answer), nor rounded finer.
MIN_CONTEXT = 4096
CONTEXT_STEP = 1024


@dataclass(frozen=True)
class ModelFacts:
    """The model a run loads: its parsed config, where it comes from, and its stored weight dtype."""

    config: ModelConfig
    hf_config: Mapping[str, Any]
    stored_dtype: str                 # float32 | bfloat16 | float16: what the weights are loaded in
    source: str                       # "checkpoint /path", "demo preset tiny", "preset qwen3_vl_2b (no weights)"
    folder: Path | None = None        # a checkpoint folder, None until the demo is written / for a bare preset
    demo: bool = False

    @property
    def params(self) -> ParamCounts:
        return count_params(self.hf_config)

    @property
    def bytes_per_param(self) -> int:
        return DTYPE_BYTES[self.stored_dtype]

    @property
    def weight_bytes(self) -> int:
        """All weights in the stored dtype (what a run without a quantising kernels plugin loads; memory planning
        uses `RunFacts.weight_format` instead)."""
        return self.params.total * self.bytes_per_param

    def sizes(self, fmt: WeightFormat) -> PartSizes:
        """Bytes of each part of the model in `fmt`."""
        return part_sizes(self.hf_config, fmt)

    @property
    def kv_bytes_per_position(self) -> int:
        """Keys and values of every layer for one position, in the stored dtype."""
        t = self.config.text
        return 2 * t.num_hidden_layers * t.num_key_value_heads * t.head_dim * self.bytes_per_param


@dataclass(frozen=True)
class ContextFacts:
    """How many positions (prompt + answer, all turns of a chat) a request may use, and why."""

    positions: int
    reason: str


@dataclass(frozen=True)
class PixelFacts:
    """The cap on an image's resized area (None: the checkpoint's own) and why. A budget only lowers the
    checkpoint's own maximum; an explicit `processing.max_pixels` replaces it."""

    max_pixels: int | None
    reason: str
    explicit: bool = False


@dataclass(frozen=True)
class RunFacts:
    """Everything plugins may validate against. Nothing below the resolver reads the machine on its own."""

    hardware: HardwareProfile
    model: ModelFacts
    context: ContextFacts
    pixels: PixelFacts = field(default_factory=lambda: PixelFacts(None, "the checkpoint's preprocessor_config"))
    # The memory budgets from the memory.* knobs (None: derived from the machine with the knobs' defaults).
    budgets: Budgets | None = None
    # How the chosen kernels plugin stores the weights; the resolver sets it for the memory slot (None: as stored).
    weights: WeightFormat | None = None

    @property
    def weight_format(self) -> WeightFormat:
        return self.weights or WeightFormat.stored(self.model.stored_dtype)

    @property
    def memory_budgets(self) -> Budgets:
        if self.budgets is not None:
            return self.budgets
        gpu = self.hardware.gpu if self.hardware.cuda_usable else None
        return derive_budgets(self.hardware.ram_gb, None if gpu is None else gpu.vram_gb)

    @classmethod
    def example(cls, hardware: HardwareProfile | None = None, hf_config: Mapping[str, Any] | None = None,
                stored_dtype: str = "float32") -> RunFacts:
        """Facts for unit tests and plugin self-tests: the given (or a plain CPU) machine and a model config
        (default: a tiny two-layer one)."""
        hw = hardware or HardwareProfile(name="example", cpu=CpuFacts(model="example cpu", physical_cores=2,
                                                                      threads=2), ram_gb=8.0,
                                         storage=StorageFacts())
        hf = dict(hf_config or TINY_HF_CONFIG)
        model = ModelFacts(ModelConfig.from_hf_dict(hf), hf, stored_dtype, "example")
        return cls(hw, model, ContextFacts(model.config.text.max_position_embeddings, "example"))


def context_budget(model: ModelFacts, hardware: HardwareProfile, *, requested: int | None,
                   profile_budget: int | None, ram_budget: int | None = None) -> ContextFacts:
    """The context in force (pure): an explicit request, else the profile's budget, else what a KV cache may
    take of the RAM (or of `ram_budget` bytes, memory.ram_budget_gb, when set) left after the weights — never more
    than the model's max_position_embeddings."""
    limit = model.config.text.max_position_embeddings
    if requested is not None:
        return ContextFacts(min(limit, requested), f"generate.max_context={requested}"
                            + (f" (model maximum {limit})" if requested > limit else ""))
    if profile_budget is not None:
        return ContextFacts(min(limit, profile_budget), f"hardware profile {hardware.name} budget")
    ram = hardware.ram_gb * GIB if ram_budget is None else min(hardware.ram_gb * GIB, ram_budget)
    spare = max(0.0, ram - model.weight_bytes)
    per_position = model.kv_bytes_per_position
    positions = int(KV_RAM_SHARE * spare // per_position) // CONTEXT_STEP * CONTEXT_STEP
    positions = min(limit, max(MIN_CONTEXT, positions))
    return ContextFacts(positions, f"{KV_RAM_SHARE:.0%} of the {spare / GIB:.1f} GiB of "
                                   f"{'RAM' if ram_budget is None else 'memory.ram_budget_gb'} left after the weights "
                                   f"at {per_position / 1024:.1f} KiB per position (model maximum {limit}); "
                                   "the cache grows on demand up to it")


# The smallest sensible Qwen3-VL: two decoder layers, a two-block vision tower (RunFacts.example's default).
TINY_HF_CONFIG: dict[str, Any] = {
    "model_type": "qwen3_vl", "tie_word_embeddings": False,
    "image_token_id": 60, "video_token_id": 61, "vision_start_token_id": 62, "vision_end_token_id": 63,
    "text_config": {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64, "hidden_act": "silu",
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [2, 1, 1]}},
    "vision_config": {"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2,
                      "hidden_act": "gelu_pytorch_tanh", "patch_size": 16, "temporal_patch_size": 2,
                      "spatial_merge_size": 2, "num_position_embeddings": 16, "out_hidden_size": 32,
                      "deepstack_visual_indexes": [0]},
}
