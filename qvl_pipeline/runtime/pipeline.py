"""The assembled pipeline: checkpoint (or demo) → processors → model with its slot plugins → generation."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.checkpoint import LoadReport, load_checkpoint, read_config
from qvl_pipeline.config.load import compose_config, to_plain
from qvl_pipeline.container import RootContainer, make_container
from qvl_pipeline.errors import CheckpointError, ConfigError, InputError
from qvl_pipeline.generation.engine import Engine, Outcome, with_recovery
from qvl_pipeline.generation.sampling import Sampler, SamplingParams
from qvl_pipeline.model.config import ModelConfig
from qvl_pipeline.model.fusion import FeatureCache, Fused
from qvl_pipeline.model.qwen3_vl import Qwen3VL
from qvl_pipeline.plan import build_plan, pixel_budget
from qvl_pipeline.processing.chat_template import ChatTemplate
from qvl_pipeline.processing.image import ImageProcessor, VisionInputs
from qvl_pipeline.processing.prompt import build_prompt
from qvl_pipeline.processing.stop_tokens import read_generation_config, stop_token_ids
from qvl_pipeline.processing.tokenizer import Tokenizer
from qvl_pipeline.processing.video import VideoInputs, VideoProcessor
from qvl_pipeline.runtime.demo import DEMO_IMAGE, ensure_demo_checkpoint
from qvl_pipeline.runtime.guard import PluginRuntimeError, guard
from qvl_pipeline.slots import KVCache, KVCacheBackend, MemoryManager, Placement

GUARDED_SLOTS = ("attention", "rotary")   # pure-compute slots that can move along their chain mid-request


@dataclass
class Request:
    """One generation request's text, pixels and prompt ids."""

    prompt: str
    images: list[str]
    video: list[str]
    input_ids: list[int]
    vision: VisionInputs | None = None
    video_inputs: Any = None


@dataclass
class Conversation:
    """State kept between chat turns: messages, the ids the cache holds, the cache, the images so far."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    cached_ids: list[int] = field(default_factory=list)
    cache: KVCache | None = None


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Pipeline:
    """`Pipeline.from_overrides([...])` then `generate(prompt, images=[...])`; see README for the fields."""

    def __init__(self, cfg: Mapping[str, Any], container: RootContainer | None = None) -> None:
        self.cfg = dict(cfg)
        self.container = container or make_container(self.cfg)
        self.model: Qwen3VL | None = None
        self.load_report: LoadReport | None = None
        self.load_s = 0.0
        self.plan: dict[str, Any] = {}

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = ()) -> Pipeline:
        """Compose the config exactly as the CLI does (same groups, same defaults) and build a pipeline."""
        return cls(to_plain(compose_config(overrides)))

    # ---- loading -------------------------------------------------------------------------------------------
    @property
    def is_demo(self) -> bool:
        return not self.cfg["model"].get("path") and bool(self.cfg["model"].get("demo"))

    def _folder(self) -> Path:
        model_cfg = self.cfg["model"]
        if model_cfg.get("path"):
            folder = Path(str(model_cfg["path"])).expanduser()
            if not folder.is_dir():
                raise CheckpointError(f"model.path={folder} is not a folder",
                                      "point model.path at the folder holding config.json and *.safetensors")
            return folder
        if not model_cfg.get("demo"):
            raise ConfigError(f"model={model_cfg.get('name')} needs a checkpoint: model.path is not set",
                              "pass model.path=/path/to/Qwen3-VL-... (a Hugging Face folder), or use model=tiny")
        return ensure_demo_checkpoint(model_cfg["hf_config"], int(model_cfg.get("seed", 0)), self._meta_model)

    def _meta_model(self, hf_config: dict[str, Any]) -> Qwen3VL:
        plugins = self.container.core.resolver().resolve_all()
        with torch.device("meta"):
            return Qwen3VL(ModelConfig.from_hf_dict(hf_config), attention=plugins["attention"],
                           rotary=plugins["rotary"], kernels=plugins["kernels"])

    def load(self) -> Pipeline:
        """Resolve plugins, read the checkpoint, build processors; idempotent."""
        if self.model is not None:
            return self
        start = time.perf_counter()
        core = self.container.core
        resolver = core.resolver()
        plugins = resolver.resolve_all()
        self.guards = {slot: guard(slot, plugins[slot]) for slot in GUARDED_SLOTS}
        self.folder = self._folder()
        config = ModelConfig.from_hf_dict(read_config(self.folder))
        kernels = plugins["kernels"]
        with torch.device("meta"):
            model = Qwen3VL(config, attention=self.guards["attention"], rotary=self.guards["rotary"],
                            kernels=kernels, feature_cache=FeatureCache(self.container.features.max_cached_images()))
        dtype = None if self.cfg["model"].get("dtype", "auto") == "auto" else self.cfg["model"]["dtype"]
        self.load_report = load_checkpoint(self.folder, model, dtype=dtype, progress=bool(self.cfg.get("progress")))
        model = kernels.prepare(model)
        model.eval()
        self.placement = self._place(model, plugins["memory"])
        self.model = model
        self.cache_backend: KVCacheBackend = plugins["kv_cache"]
        self.tokenizer = Tokenizer.from_folder(self.folder)
        self.template = ChatTemplate.from_folder(self.folder)
        self.stop_ids = stop_token_ids(read_generation_config(self.folder), self.tokenizer)
        max_pixels, _ = pixel_budget(self.cfg, core.hardware_report())
        proc = self.cfg.get("processing", {})
        self.images = ImageProcessor.from_folder(self.folder, max_pixels=max_pixels, min_pixels=proc.get("min_pixels"),
                                                 max_image_pixels=int(proc.get("max_image_pixels", 178_956_970)))
        self.load_s = time.perf_counter() - start
        self.plan = build_plan(self.cfg, core.hardware_report(), resolver)
        self.plan["model"]["checkpoint"] = {"folder": str(self.folder), "demo": self.is_demo,
                                            "load": str(self.load_report), "placement": self.placement.summary()}
        return self

    def _place(self, model: Qwen3VL, memory: MemoryManager) -> Placement:
        def size(module: torch.nn.Module) -> int:
            return sum(p.numel() * p.element_size() for p in module.parameters())
        body = model.model
        layers = list(body.language_model.layers)
        head = 0 if model.lm_head is None else size(model.lm_head)
        placement = memory.place([size(layer) for layer in layers], size(body.visual),
                                 size(body.language_model.embed_tokens), head)
        body.visual.to(placement.vision)
        for layer, device in zip(layers, placement.layers, strict=True):
            layer.to(device)
        body.language_model.norm.to(placement.layers[-1] if placement.layers else placement.head)
        if model.lm_head is not None:
            model.lm_head.to(placement.head)
        return placement

    # ---- requests ------------------------------------------------------------------------------------------
    def demo_images(self) -> list[str]:
        """The generated demo picture (CLI runs on the demo use it when no image is given)."""
        self.load()
        return [str(self.folder / DEMO_IMAGE)] if self.is_demo else []

    def _sampler(self, overrides: Mapping[str, Any]) -> tuple[Sampler, int]:
        gen = {**self.cfg["generate"], **{k: v for k, v in overrides.items() if v is not None}}
        params = SamplingParams(temperature=float(gen["temperature"]), top_k=int(gen["top_k"]),
                                top_p=float(gen["top_p"]), min_p=float(gen["min_p"]),
                                repetition_penalty=float(gen["repetition_penalty"]), seed=int(gen["seed"]))
        max_new = int(gen["max_new_tokens"])
        if max_new < 1:
            raise ConfigError(f"generate.max_new_tokens must be ≥ 1, got {max_new}", "set generate.max_new_tokens=64")
        return Sampler(params), max_new

    def _context_limit(self) -> int:
        assert self.model is not None
        limit = self.model.config.text.max_position_embeddings
        override = self.cfg["generate"].get("max_context")
        budget = self.container.core.hardware_report().profile.budgets.get("max_context")
        if override:
            return min(limit, int(override))
        if budget and self.cfg["opt"].get("use_budgets", True):
            return min(limit, int(budget))
        return limit

    def _fuse(self, input_ids: list[int], vision: VisionInputs | None,
              clips: VideoInputs | None = None) -> tuple[Fused, float]:
        assert self.model is not None
        ids = torch.tensor([input_ids], dtype=torch.long, device=self.model.device)
        dtype = self.model.dtype
        pixels = None if vision is None else vision.pixel_values.to(dtype)
        frames = None if clips is None else clips.pixel_values.to(dtype)
        start = time.perf_counter()
        with torch.inference_mode():
            fused = self.model.prepare(ids, pixels, None if vision is None else vision.grid_thw,
                                       frames, None if clips is None else clips.grid_thw)
        return fused, time.perf_counter() - start

    def _video_processor(self) -> VideoProcessor:
        if getattr(self, "_videos", None) is None:
            max_pixels, _ = pixel_budget(self.cfg, self.container.core.hardware_report())
            self._videos = VideoProcessor.from_folder(self.folder, max_pixels=max_pixels)
        return self._videos

    def _recover(self, failure: PluginRuntimeError) -> None:
        resolver = self.container.core.resolver()
        if failure.slot not in self.guards:
            raise failure
        replacement = resolver.fallback(failure.slot, failure.error)
        self.guards[failure.slot].retarget(replacement)
        self.plan["slots"] = resolver.plan()
        print(f"qvl-pipeline: {failure}; continuing with {failure.slot}={replacement.name}", file=sys.stderr)

    def _run(self, input_ids: list[int], vision: VisionInputs | None, conversation: Conversation | None,
             on_text: Callable[[str], None] | None, overrides: Mapping[str, Any],
             clips: VideoInputs | None = None) -> dict[str, Any]:
        assert self.model is not None
        sampler, max_new = self._sampler(overrides)
        context = self._context_limit()
        if len(input_ids) >= context:
            raise InputError(f"the prompt has {len(input_ids)} tokens but the context holds {context}",
                             "shorten the prompt, use fewer/smaller images (processing.max_pixels=...), "
                             "or raise generate.max_context")
        recoveries: list[str] = []
        fused, vision_s = with_recovery(lambda: self._fuse(input_ids, vision, clips), self._recover, recoveries)
        start = 0
        cache = conversation.cache if conversation is not None else None
        if cache is not None:
            start = min(_common_prefix(conversation.cached_ids, input_ids), len(input_ids) - 1)
            cache.truncate(start)
        else:
            max_len = min(context, len(input_ids) + max_new)
            if conversation is not None:
                max_len = context
            cache = self.cache_backend.create(self.model.cache_shape(1, max_len), self.model.dtype, self.model.device)
        stream = self.tokenizer.decode_stream() if on_text is not None else None
        streamed: list[str] = []

        def on_token(token: int) -> None:
            if stream is not None and token not in self.stop_ids:
                piece = stream.step(self.tokenizer.backend, token)
                if piece:
                    streamed.append(piece)
                    on_text(piece)

        with torch.inference_mode():
            outcome: Outcome = Engine(self.model, self._recover).run(
                fused, cache, context_ids=input_ids, start=start, sampler=sampler, max_new_tokens=max_new,
                stop_ids=self.stop_ids, on_token=on_token, recoveries=recoveries)
        if conversation is not None:
            conversation.cache = cache
            conversation.cached_ids = list(input_ids) + outcome.tokens[:-1]
        text = self.tokenizer.decode([t for t in outcome.tokens if t not in self.stop_ids])
        sent = "".join(streamed)
        if on_text is not None and text.startswith(sent) and len(text) > len(sent):
            on_text(text[len(sent):])    # the tail the stream held back (an incomplete UTF-8 sequence)
        return {
            "text": text, "token_ids": outcome.tokens, "prompt_tokens": len(input_ids),
            "cached_prompt_tokens": start, "stop_reason": outcome.stop_reason, "demo": self.is_demo,
            "plan": self.plan, "runtime_fallbacks": outcome.recoveries,
            "timings": {"load_s": round(self.load_s, 4), "vision_s": round(vision_s, 4),
                        "prefill_s": round(outcome.prefill_s, 4), "decode_s": round(outcome.decode_s, 4),
                        "decode_tokens_per_s": outcome.decode_tokens_per_s},
        }

    def generate(self, prompt: str, images: Sequence[str] = (), *, video: Sequence[str] = (),
                 max_new_tokens: int | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
                 seed: int | None = None, on_text: Callable[[str], None] | None = None) -> dict[str, Any]:
        """One user turn (images first, then the text) → text, token_ids, prompt_tokens, plan, timings."""
        self.load()
        images = list(images)
        vision = self.images(images) if images else None
        clips = self._video_processor()([list(video)]) if video else None
        specs = clips.prompt_specs() if clips is not None else []
        prompt_obj = build_prompt(self.tokenizer, self.template, prompt,
                                  image_tokens=vision.token_counts() if vision else (), videos=specs)
        overrides = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
        result = self._run(prompt_obj.input_ids, vision, None, on_text, overrides, clips)
        result["images"] = list(images)
        result["video_frames"] = len(video)
        return result

    def chat_turn(self, conversation: Conversation, text: str, images: Sequence[str] = (),
                  on_text: Callable[[str], None] | None = None, **overrides: Any) -> dict[str, Any]:
        """One more turn of `conversation`, reusing its KV cache and the cached image features."""
        self.load()
        conversation.images.extend(images)
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        conversation.messages.append({"role": "user", "content": content})
        vision = self.images(conversation.images) if conversation.images else None
        prompt_obj = build_prompt(self.tokenizer, self.template, text, messages=conversation.messages,
                                  image_tokens=vision.token_counts() if vision else ())
        result = self._run(prompt_obj.input_ids, vision, conversation, on_text, overrides)
        conversation.messages.append({"role": "assistant", "content": [{"type": "text", "text": result["text"]}]})
        return result
