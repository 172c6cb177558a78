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
    # How the budget was derived from RAM (None: requested, or the profile's budget): `for_kv` derives it again at
    # the KV cache's real bytes per position once the kv_cache plugin is known.
    ram_share: RamShare | None = None

    def for_kv(self, per_position: int) -> ContextFacts:
        """This budget at `per_position` bytes of KV cache per position (itself when it does not depend on them)."""
        return self if self.ram_share is None else self.ram_share.context(per_position)


@dataclass(frozen=True)
class RamShare:
    """A context budget derived from RAM (pure): KV_RAM_SHARE of the `spare` bytes left after the weights (of
    `what`: the machine's RAM or memory.ram_budget_gb), in whole CONTEXT_STEPs, at least MIN_CONTEXT, at most the
    model's `limit` positions."""

    spare: float
    what: str
    limit: int

    def context(self, per_position: int) -> ContextFacts:
        positions = int(KV_RAM_SHARE * self.spare // per_position) // CONTEXT_STEP * CONTEXT_STEP
        positions = min(self.limit, max(MIN_CONTEXT, positions))
        return ContextFacts(positions, f"{KV_RAM_SHARE:.0%} of the {self.spare / GIB:.1f} GiB of {self.what} left "
                                       f"after the weights at {per_position / 1024:.1f} KiB per position (model "
                                       f"maximum {self.limit}); the cache grows on demand up to it", self)


@dataclass(frozen=True)
class KVFacts:
    """The KV cache as the run's kv_cache plugin stores it (RunFacts.kv): the dtype keys and values are computed in
    (the model's activations), and the bytes one position takes in every layer (keys and values, one sequence)."""

    dtype: str
    bytes_per_position: int


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
    # How the chosen kv_cache plugin stores the cache; the resolver sets it for the memory slot and the run, with the
    # context derived at its size (None: not known yet, the model's dtype is assumed).
    kv: KVFacts | None = None
    # The dtype the chosen kernels plugin's activations and KV cache flow in; set with `weights` (None: not known).
    compute_dtype: str | None = None

    @property
    def weight_format(self) -> WeightFormat:
        return self.weights or WeightFormat.stored(self.model.stored_dtype)

    @property
    def activation_dtype(self) -> str:
        """The dtype the model's activations, and so its KV cache, are in (Qwen3VL.dtype): the chosen kernels
        plugin's compute dtype once known (`compute_dtype`), else the loader's dtype (`model.stored_dtype`, the
        checkpoint's or model.dtype), unless the kernels plugin's weight format widens the weights outside the
        linears (fp32_compute: float32)."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        stored = self.model.stored_dtype
        return "float32" if self.weight_format.other_bytes > DTYPE_BYTES[stored] else stored

    @property
    def kv_bytes_per_position(self) -> int:
        """Bytes of KV cache one position takes in every layer: the kv_cache plugin's figure once known, else the
        model's in its stored dtype."""
        return self.kv.bytes_per_position if self.kv is not None else self.model.kv_bytes_per_position

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
    than the model's max_position_embeddings. A RAM-derived budget assumes the model's dtype for the KV cache until
    the kv_cache plugin says its real size (`ContextFacts.for_kv`, applied by `Resolver.run_facts`)."""
    limit = model.config.text.max_position_embeddings
    if requested is not None:
        return ContextFacts(min(limit, requested), f"generate.max_context={requested}"
                            + (f" (model maximum {limit})" if requested > limit else ""))
    if profile_budget is not None:
        return ContextFacts(min(limit, profile_budget), f"hardware profile {hardware.name} budget")
    ram = hardware.ram_gb * GIB if ram_budget is None else min(hardware.ram_gb * GIB, ram_budget)
    share = RamShare(max(0.0, ram - model.weight_bytes), "RAM" if ram_budget is None else "memory.ram_budget_gb",
                     limit)
    return share.context(model.kv_bytes_per_position)


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
