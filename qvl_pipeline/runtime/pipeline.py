"""The assembled pipeline: it receives the loaded model, processors, KV-cache factory, engine and plan from the
container (see `qvl_pipeline.container`) and answers requests: prompt + images → streamed text."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.errors import ConfigError, InputError
from qvl_pipeline.facts import CONTEXT_STEP, ContextFacts, RunFacts
from qvl_pipeline.generation.engine import Engine, Outcome, with_recovery
from qvl_pipeline.generation.sampling import Sampler, SamplingParams
from qvl_pipeline.model.fusion import Fused
from qvl_pipeline.plan import RunPlan
from qvl_pipeline.processing.chat_template import ChatTemplate
from qvl_pipeline.processing.image import ImageProcessor, VisionInputs
from qvl_pipeline.processing.prompt import build_prompt
from qvl_pipeline.processing.tokenizer import Tokenizer
from qvl_pipeline.processing.video import VideoInputs, VideoProcessor
from qvl_pipeline.runtime.demo import DEMO_IMAGE
from qvl_pipeline.slots import KVCache

if TYPE_CHECKING:
    from qvl_pipeline.container import RootContainer
    from qvl_pipeline.runtime.assembly import KVCaches, LoadedModel


@dataclass
class Processors:
    """The text and pixel side of a checkpoint: tokenizer, chat template, stop ids, image and video processors."""

    tokenizer: Tokenizer
    template: ChatTemplate
    stop_ids: list[int]
    images: ImageProcessor
    videos: Callable[[], VideoProcessor]          # built on the first video


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


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def check_context(prompt: int, max_new: int, context: ContextFacts, model_limit: int, *, chat: bool) -> None:
    """Refuse, before any compute, a request whose prompt (for a chat: the whole conversation so far with this
    message) plus max_new_tokens needs more positions than the context holds; the message names the numbers and
    each way out."""
    needed = prompt + max_new
    if needed <= context.positions:
        return
    what = "this turn" if chat else "this request"
    prompt_part = f"{prompt} tokens of conversation including this message" if chat else f"{prompt} prompt tokens"
    fixes = (["/reset to start a new conversation (in Python: a new Conversation)", "a shorter message"] if chat
             else ["a shorter prompt or fewer/smaller images (processing.max_pixels=...)"])
    if prompt < context.positions:
        fixes.append(f"fewer new tokens (generate.max_new_tokens={context.positions - prompt} fits)")
    if needed <= model_limit:
        fixes.append(f"a longer context (generate.max_context={needed}, memory permitting)")
    limit = f" (the model holds at most {model_limit} positions)" if needed > model_limit else ""
    raise InputError(f"{what} needs {needed} positions ({prompt_part} + generate.max_new_tokens={max_new}) but "
                     f"the context holds {context.positions} ({context.reason})", "; or ".join(fixes) + limit)


class Pipeline:
    """`Pipeline.from_overrides([...])` then `generate(prompt, images=[...])`; see README for the fields."""

    def __init__(self, config: RootConfig, *, loaded: LoadedModel, processors: Processors, caches: KVCaches,
                 engine: Engine, plan: RunPlan, facts: RunFacts, started: float = 0.0) -> None:
        self.config = config
        self.loaded = loaded
        self.model = loaded.model
        self.processors = processors
        self.tokenizer, self.template, self.stop_ids = processors.tokenizer, processors.template, processors.stop_ids
        self.images = processors.images
        self.caches = caches
        self.engine = engine
        self.run_plan = plan
        self.facts = facts
        self.load_s = time.perf_counter() - started if started else loaded.seconds

    @classmethod
    def from_container(cls, container: RootContainer) -> Pipeline:
        """The pipeline the container builds (loading the model); swap parts with `.override()` before."""
        return container.pipeline()

    @classmethod
    def from_overrides(cls, overrides: Sequence[str] = ()) -> Pipeline:
        """Compose the config exactly as the CLI does (same groups, same defaults), build and load the pipeline."""
        from qvl_pipeline.config.load import load_config
        from qvl_pipeline.container import make_container

        return cls.from_container(make_container(load_config(overrides)))

    def load(self) -> Pipeline:
        """The pipeline is built loaded; kept so `Pipeline.from_overrides(...).load()` reads naturally."""
        return self

    @property
    def plan(self) -> dict[str, Any]:
        """The run's plan (plain data), with what loading measured and any runtime fallbacks so far."""
        return self.run_plan.to_dict(self.loaded)

    @property
    def is_demo(self) -> bool:
        return self.facts.model.demo

    @property
    def folder(self) -> Path:
        assert self.facts.model.folder is not None
        return self.facts.model.folder

    # ---- requests ------------------------------------------------------------------------------------------
    def demo_images(self) -> list[str]:
        """The generated demo picture (CLI runs on the demo use it when no image is given)."""
        return [str(self.folder / DEMO_IMAGE)] if self.is_demo else []

    def first_logits(self, prompt: str, images: Sequence[str] = ()) -> torch.Tensor:
        """The logits [vocab] (fp32) that choose the first answer token for `prompt` (+ images), without a cache:
        for comparing configurations (accuracy reports, task=validate)."""
        vision = self.images(list(images)) if images else None
        fused, _ = self._fuse(self._prompt_ids(prompt, vision), vision)
        with torch.inference_mode():
            logits = self.model.forward_decoder(fused.inputs_embeds, fused.position_ids, None, fused.visual_mask,
                                                fused.deepstack, last_only=True)
        return logits[0, -1].float()

    def _prompt_ids(self, text: str, vision: VisionInputs | None, **kwargs: Any) -> list[int]:
        """The chat-templated, placeholder-expanded ids of one turn (`messages=` for a whole conversation)."""
        return build_prompt(self.tokenizer, self.template, text,
                            image_tokens=vision.token_counts() if vision else (),
                            allow_special_tokens=self.config.processing.allow_special_tokens, **kwargs).input_ids

    def _sampler(self, overrides: Mapping[str, Any]) -> tuple[Sampler, int]:
        gen = {**vars(self.config.generate), **{k: v for k, v in overrides.items() if v is not None}}
        params = SamplingParams(temperature=float(gen["temperature"]), top_k=int(gen["top_k"]),
                                top_p=float(gen["top_p"]), min_p=float(gen["min_p"]),
                                repetition_penalty=float(gen["repetition_penalty"]), seed=int(gen["seed"]))
        max_new = int(gen["max_new_tokens"])
        if max_new < 1:
            raise ConfigError(f"generate.max_new_tokens must be ≥ 1, got {max_new}", "set generate.max_new_tokens=64")
        return Sampler(params), max_new

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

    def _run(self, input_ids: list[int], vision: VisionInputs | None, conversation: Conversation | None,
             on_text: Callable[[str], None] | None, overrides: Mapping[str, Any],
             clips: VideoInputs | None = None) -> dict[str, Any]:
        assert self.model is not None
        sampler, max_new = self._sampler(overrides)
        context = self.facts.context.positions
        check_context(len(input_ids), max_new, self.facts.context,
                      self.facts.model.config.text.max_position_embeddings, chat=conversation is not None)
        recoveries: list[str] = []
        fused, vision_s = with_recovery(lambda: self._fuse(input_ids, vision, clips), self.engine.recover,
                                        recoveries, where="the vision encoder and prompt embedding")
        start = 0
        cache = conversation.cache if conversation is not None else None
        needed = len(input_ids) + max_new                # ≤ context (check_context)
        if cache is not None:
            start = min(_common_prefix(conversation.cached_ids, input_ids), len(input_ids) - 1)
            cache.truncate(start)
            if needed > cache.shape.max_len:       # a chat grows its cache on demand, up to the context
                cache.grow(min(context, _round_up(needed, CONTEXT_STEP)))
        else:
            # A chat starts with room for a few turns, not the whole context; one request takes what it needs.
            cache = self.caches.create(min(context, _round_up(needed, CONTEXT_STEP)) if conversation else needed)
        stream = self.tokenizer.decode_stream() if on_text is not None else None
        streamed: list[str] = []

        def on_token(token: int) -> None:
            if stream is not None and token not in self.stop_ids:
                piece = stream.step(self.tokenizer.backend, token)
                if piece:
                    streamed.append(piece)
                    on_text(piece)

        with torch.inference_mode():
            outcome: Outcome = self.engine.run(
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
        images = list(images)
        vision = self.images(images) if images else None
        clips = self.processors.videos()([list(video)]) if video else None
        specs = clips.prompt_specs() if clips is not None else []
        input_ids = self._prompt_ids(prompt, vision, videos=specs)
        overrides = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         min_p=min_p, repetition_penalty=repetition_penalty, seed=seed)
        result = self._run(input_ids, vision, None, on_text, overrides, clips)
        result["images"] = list(images)
        result["video_frames"] = len(video)
        return result

    def chat_turn(self, conversation: Conversation, text: str, images: Sequence[str] = (),
                  on_text: Callable[[str], None] | None = None, **overrides: Any) -> dict[str, Any]:
        """One more turn of `conversation`, reusing its KV cache and the cached image features. A turn that fails
        (any exception, Ctrl-C included) leaves the conversation as it was: its message and images are dropped, and
        the cache is reused next turn only if the failure left it untouched."""
        n_messages, n_images = len(conversation.messages), len(conversation.images)
        cache_length = conversation.cache.length if conversation.cache is not None else 0
        try:
            conversation.images.extend(images)
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
            conversation.messages.append({"role": "user", "content": content})
            vision = self.images(conversation.images) if conversation.images else None
            input_ids = self._prompt_ids(text, vision, messages=conversation.messages)
            result = self._run(input_ids, vision, conversation, on_text, overrides)
        except BaseException:
            del conversation.messages[n_messages:], conversation.images[n_images:]
            if conversation.cache is not None and conversation.cache.length != cache_length:
                conversation.cached_ids = []
            raise
        conversation.messages.append({"role": "assistant", "content": [{"type": "text", "text": result["text"]}]})
        return result
