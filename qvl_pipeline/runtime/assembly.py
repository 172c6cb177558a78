"""The pieces the container wires: the model's facts from its checkpoint (or the demo), the run's facts, loading
and placing the model, per-request KV caches. Plain functions and small classes; no wiring decisions here."""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint import LoadReport, load_checkpoint, read_config
from qvl_pipeline.checkpoint.config import model_config_from_dict, resolve_dtype
from qvl_pipeline.checkpoint.files import find_weight_files
from qvl_pipeline.config.schema import (
    GenerateConfig,
    HardwareConfig,
    MemorySlotConfig,
    OptConfig,
    ProcessingConfig,
    RootConfig,
)
from qvl_pipeline.config.schema import ModelConfig as ModelSection
from qvl_pipeline.errors import CheckpointError, ConfigError
from qvl_pipeline.facts import ContextFacts, ModelFacts, PixelFacts, RunFacts, context_budget
from qvl_pipeline.hardware.build import HardwareReport, Prober, build_hardware
from qvl_pipeline.hardware.profile import HardwareProfile
from qvl_pipeline.memory_plan import Budgets, MemoryKnobs, derive_budgets
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.qwen3_vl import Qwen3VL, skeleton
from qvl_pipeline.processing.image import ImageProcessor
from qvl_pipeline.processing.tokenizer import Tokenizer, check_special_token_ids
from qvl_pipeline.processing.video import VideoProcessor
from qvl_pipeline.processing.vision_config import read_vision_config
from qvl_pipeline.registry import SLOT_NAMES
from qvl_pipeline.runtime.demo import ensure_demo_checkpoint
from qvl_pipeline.slots import KernelsBackend, KVCache, KVCacheBackend, MemoryManager, Placement
from qvl_pipeline.slots.memory import ModelParts


def hardware_report(hardware: HardwareConfig, prober: Prober, model_path: str | None) -> HardwareReport:
    """The effective machine facts for the `hardware` config slice."""
    return build_hardware(dataclasses.asdict(hardware), prober, model_path)


def _stored_dtype(config: Mapping[str, Any], override: str, folder: Path | None) -> str:
    """The dtype weights are loaded in: the override, the config's declared dtype, else the first shard's."""
    dtype = resolve_dtype(config, None if override == "auto" else override)
    if dtype is None and folder is not None:
        files = find_weight_files(folder)
        floating = [t.dtype for t in files.tensors.values() if t.dtype in ("F32", "BF16", "F16")]
        dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(
            floating[0] if floating else "F32")
    return str(dtype or torch.float32).removeprefix("torch.")


def model_facts(model: ModelSection) -> ModelFacts:
    """The model the run will load: a checkpoint folder's config.json, the demo (written on first use), or a bare
    preset (planning only: nothing to load)."""
    if model.path:
        folder = Path(model.path).expanduser()
        if not folder.is_dir():
            raise CheckpointError(f"model.path={folder} is not a folder",
                                  "point model.path at the folder holding config.json and *.safetensors")
        source, demo = f"checkpoint {folder}", False
    elif model.demo:
        folder = ensure_demo_checkpoint(model.hf_config, model.seed, lambda hf: skeleton(ModelConfig.from_hf_dict(hf)))
        source, demo = f"demo preset {model.name} (deterministic random weights)", True
    else:
        hf = dict(model.hf_config)
        return ModelFacts(ModelConfig.from_hf_dict(hf), hf, _stored_dtype(hf, model.dtype, None),
                          f"preset {model.name} (no weights: set model.path to run it)")
    hf = read_config(folder)
    return ModelFacts(model_config_from_dict(hf, folder / "config.json"), hf, _stored_dtype(hf, model.dtype, folder),
                      source, folder, demo)


def pixel_budget(processing: ProcessingConfig, opt: OptConfig, report: HardwareReport) -> PixelFacts:
    """The max_pixels cap in force and where it comes from (pure)."""
    if processing.max_pixels:
        return PixelFacts(int(processing.max_pixels), "processing.max_pixels override", explicit=True)
    budget = report.profile.budgets.get("max_pixels")
    if budget and opt.use_budgets:
        return PixelFacts(int(budget), f"hardware profile {report.target} budget")
    return PixelFacts(None, "the checkpoint's preprocessor_config (no cap)")


def memory_budgets(memory: MemorySlotConfig, hardware: HardwareProfile) -> Budgets:
    """The RAM/VRAM budgets from the memory.* knobs and the (effective, possibly emulated) machine."""
    gpu = hardware.gpu if hardware.cuda_usable else None
    knobs = MemoryKnobs(memory.ram_budget_gb, memory.vram_budget_gb, memory.reserve_gb)
    return derive_budgets(hardware.ram_gb, None if gpu is None else gpu.vram_gb, knobs)


def run_facts(report: HardwareReport, model: ModelFacts, generate: GenerateConfig, processing: ProcessingConfig,
              opt: OptConfig, memory: MemorySlotConfig) -> RunFacts:
    """RunFacts: machine, model, the context a request may use, the pixel budget and the memory budgets."""
    profile_context = report.profile.budgets.get("max_context") if opt.use_budgets else None
    budgets = memory_budgets(memory, report.profile)
    context: ContextFacts = context_budget(model, report.profile, requested=generate.max_context,
                                           profile_budget=profile_context,
                                           ram_budget=budgets.ram if memory.ram_budget_gb is not None else None)
    return RunFacts(report.profile, model, context, pixel_budget(processing, opt, report), budgets=budgets)


def checkpoint_folder(model: ModelFacts) -> Path:
    """The folder to load; a bare preset has none."""
    if model.folder is None:
        raise ConfigError(f"{model.source}: there is no checkpoint to load",
                          "pass model.path=/path/to/Qwen3-VL-... (a Hugging Face folder), or use model=tiny")
    return model.folder


@dataclass
class LoadedModel:
    """The model with its weights, where each part lives, and what loading did."""

    model: Qwen3VL
    report: LoadReport
    placement: Placement
    seconds: float
    decode_step: str = "per op"          # how a decode step runs (settle_decode_step), for the plan


def slot_configs(config: RootConfig) -> dict[str, Any]:
    """The config slice of each plugin slot."""
    return {slot: getattr(config, slot) for slot in SLOT_NAMES}


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def part_sizes(model: Qwen3VL) -> tuple[list[int], int, int, int]:
    """The real, prepared bytes of each part: (per decoder layer, vision tower, embeddings, head) — what
    `MemoryManager.place` takes."""
    body = model.model
    head = 0 if model.lm_head is None else _bytes(model.lm_head)
    return ([_bytes(layer) for layer in body.language_model.layers], _bytes(body.visual),
            _bytes(body.language_model.embed_tokens), head)


def move_parts(model: Qwen3VL, placement: Placement) -> None:
    """Move each part to its device in `placement` (the final norm goes with the last decoder layer)."""
    body = model.model
    layers = list(body.language_model.layers)
    body.visual.to(placement.vision)
    body.language_model.embed_tokens.to(placement.embed)
    for layer, device in zip(layers, placement.layers, strict=True):
        layer.to(device)
    body.language_model.norm.to(placement.layers[-1] if placement.layers else placement.head)
    if model.lm_head is not None:
        model.lm_head.to(placement.head)


def model_parts(model: Qwen3VL) -> ModelParts:
    """The parts the memory plugin's run-time hooks see: the decoder layers (as the sequence), the vision tower and
    its blocks, the embeddings, the final norm and the head (which a plugin may replace, e.g. by row ranges)."""
    body = model.model
    return ModelParts(layers=tuple(body.language_model.layers), vision=body.visual,
                      vision_blocks=tuple(body.visual.blocks), embed=body.language_model.embed_tokens,
                      norm=body.language_model.norm, head=model.lm_head,
                      replace_head=lambda head: setattr(model, "lm_head", head))


def place(model: Qwen3VL, memory: MemoryManager) -> Placement:
    """Ask the memory plugin where each part goes (by its real, prepared size), move it there and let the plugin
    attach its run-time hooks (memory=ssd_stream's prefetcher); returns where the parts compute."""
    placement = memory.place(*part_sizes(model))
    move_parts(model, placement)
    return memory.attach(model_parts(model), placement)


def settle_decode_step(model: Qwen3VL, memory: MemoryManager, kernels: KernelsBackend) -> str:
    """Give the decoder the kernels plugin's fused decode step where the memory plugin keeps the weights in place
    (asked again after every placement change); returns how a decode step runs, for the plan."""
    text = model.model.language_model
    text.decode_step = None
    if not memory.resident_weights:
        return f"per op (memory={memory.name} moves weights while running)"
    step, why = kernels.decode_step(tuple(text.layers), model.dtype)
    text.decode_step = step
    return "the decoder stack in one native call per token" if step is not None else f"per op ({why})"


def load_model(skeleton_model: Qwen3VL, folder: Path, kernels: Any, memory: MemoryManager, dtype: str,
               progress: bool) -> LoadedModel:
    """Fill the meta-device model from the checkpoint, let the kernels plugin prepare it, let activations flow in the
    plugin's compute dtype for the dtype the weights were loaded in, place it."""
    start = time.perf_counter()
    report = load_checkpoint(folder, skeleton_model, dtype=None if dtype == "auto" else dtype, progress=progress)
    stored = skeleton_model.dtype                        # the token embeddings' dtype as loaded
    model = kernels.prepare(skeleton_model)
    model.use_compute_dtype(kernels.compute_dtype(stored))
    model.eval()
    placement = place(model, memory)
    return LoadedModel(model, report, placement, time.perf_counter() - start,
                       settle_decode_step(model, memory, kernels))


def pixel_cap(folder: Path, pixels: PixelFacts, video: bool = False) -> int | None:
    """The max_pixels to process with: an explicit override as given; a budget never above the checkpoint's own."""
    if pixels.max_pixels is None or pixels.explicit:
        return pixels.max_pixels
    return min(pixels.max_pixels, read_vision_config(folder, video=video).max_pixels)


def checked_tokenizer(folder: Path, config: ModelConfig) -> Tokenizer:
    """The checkpoint's tokenizer, after checking config.json's vision token ids and vocabulary against it."""
    tokenizer = Tokenizer.from_folder(folder)
    check_special_token_ids(tokenizer, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                            vision_start_token_id=config.vision_start_token_id,
                            vision_end_token_id=config.vision_end_token_id, vocab_size=config.text.vocab_size)
    return tokenizer


def image_processor(folder: Path, model: ModelFacts, pixels: PixelFacts,
                    processing: ProcessingConfig) -> ImageProcessor:
    """The checkpoint's image processor under the pixel budget, its patch geometry checked against the model's."""
    processor = ImageProcessor.from_folder(folder, max_pixels=pixel_cap(folder, pixels),
                                           min_pixels=processing.min_pixels,
                                           max_image_pixels=processing.max_image_pixels)
    processor.config.check_against(model.hf_config.get("vision_config") or {})
    return processor


def video_processor(folder: Path, pixels: PixelFacts, processing: ProcessingConfig) -> VideoProcessor:
    """The checkpoint's video processor under the same pixel budget and decompression guard as images."""
    return VideoProcessor.from_folder(folder, max_pixels=pixel_cap(folder, pixels, video=True),
                                      max_image_pixels=processing.max_image_pixels)


class KVCaches:
    """Creates request caches shaped for the model, each layer's buffers on the device that layer computes on, and
    keeps track of the live ones so a placement change at run time can move them (`relocate`)."""

    def __init__(self, backend: KVCacheBackend, loaded: LoadedModel) -> None:
        self.backend = backend
        self.loaded = loaded
        self.model = loaded.model
        self.live: weakref.WeakSet[KVCache] = weakref.WeakSet()      # request and conversation caches in use

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """Where each decoder layer computes now (the placement can change after an out-of-memory)."""
        return tuple(torch.device(d) for d in self.loaded.placement.layers)

    def create(self, max_len: int) -> KVCache:
        cache = self.backend.create(self.model.cache_shape(1, max_len), self.model.dtype, self.devices)
        self.live.add(cache)
        return cache

    def relocate(self) -> None:
        """Move every live cache's layers to where the layers compute now, keeping their contents."""
        for cache in list(self.live):
            cache.relocate(self.devices)
