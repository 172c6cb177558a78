"""The composition root: dependency-injector containers that build the whole run from the typed config.

Core: machine facts → the model's facts (its checkpoint's config.json) → the gathered RunFacts → resolver → one
plugin per slot (guarded where runtime fallback applies); the run's facts are the gathered ones completed with the
kernels plugin's weight format and the kv_cache plugin's cache size (the context budget derived at it). Stages get
their slice of config and the plugins they need and build their part of the model on the meta device; the root
assembles the model, loads and places it, and builds the processors, KV-cache factory, engine and pipeline. Tests
and experiments swap any provider with `.override()` and the run executes what they swapped in.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from dependency_injector import containers, providers

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.generation.engine import Engine
from qvl_pipeline.hardware.probe import probe_machine
from qvl_pipeline.model.fusion import FeatureCache
from qvl_pipeline.model.qwen3_vl import Qwen3VL, output_head
from qvl_pipeline.model.text import TextModel
from qvl_pipeline.model.vision import VisionTower
from qvl_pipeline.plan import RunPlan
from qvl_pipeline.processing.chat_template import ChatTemplate
from qvl_pipeline.processing.stop_tokens import read_generation_config, stop_token_ids
from qvl_pipeline.registry import PluginRegistry
from qvl_pipeline.resolver import Resolver
from qvl_pipeline.runtime import assembly
from qvl_pipeline.runtime.guard import guard
from qvl_pipeline.runtime.pipeline import Pipeline, Processors
from qvl_pipeline.runtime.recovery import Recovery


def on_meta(build: Any, *args: Any, **kwargs: Any) -> Any:
    """`build(*args, **kwargs)` with every tensor on the meta device (shapes only; the loader fills them)."""
    with torch.device("meta"):
        return build(*args, **kwargs)


def _resolve(resolver: Resolver, slot: str) -> Any:
    return resolver.resolve(slot)


def _run_facts(resolver: Resolver) -> Any:
    return resolver.run_facts()


class CoreContainer(containers.DeclarativeContainer):
    """Facts, the plugin registry, resolution and one resolved plugin per slot (singletons)."""

    config = providers.Dependency(instance_of=RootConfig)
    prober = providers.Object(probe_machine)
    registry = providers.Singleton(PluginRegistry)

    hardware_report = providers.Singleton(assembly.hardware_report, config.provided.hardware, prober,
                                          config.provided.model.path)
    model_facts = providers.Singleton(assembly.model_facts, config.provided.model)
    gathered_facts = providers.Singleton(assembly.run_facts, hardware_report, model_facts, config.provided.generate,
                                         config.provided.processing, config.provided.opt, config.provided.memory)
    resolver = providers.Singleton(Resolver, registry, gathered_facts, config.provided.opt,
                                   providers.Callable(assembly.slot_configs, config))
    # The run's facts: the gathered ones with the kernels plugin's weight format and the kv_cache plugin's cache size
    # (the context budget derived at it); what the memory slot, the plan and the pipeline go by.
    facts = providers.Singleton(_run_facts, resolver)

    attention = providers.Singleton(_resolve, resolver, "attention")
    rotary = providers.Singleton(_resolve, resolver, "rotary")
    kernels = providers.Singleton(_resolve, resolver, "kernels")
    memory = providers.Singleton(_resolve, resolver, "memory")
    kv_cache = providers.Singleton(_resolve, resolver, "kv_cache")
    # The model holds guards, never the plugins: a runtime failure re-points a guard to the next chain entry.
    attention_guard = providers.Singleton(guard, "attention", attention)
    rotary_guard = providers.Singleton(guard, "rotary", rotary)
    plan = providers.Singleton(RunPlan, hardware_report, facts, resolver, config.provided.opt.level)


class VisionStage(containers.DeclarativeContainer):
    """Stage 1: the vision encoder and the image processor, with their slice of config."""

    processing = providers.Dependency()          # ProcessingConfig
    pixels = providers.Dependency()              # PixelFacts: the max_pixels in force
    model_config = providers.Dependency()        # the checkpoint's VisionConfig
    model_facts = providers.Dependency()         # ModelFacts (config.json, for the processor's geometry check)
    folder = providers.Dependency()              # the checkpoint folder (preprocessor configs)
    attention = providers.Dependency()
    rotary = providers.Dependency()
    kernels = providers.Dependency()

    tower = providers.Factory(on_meta, VisionTower, model_config, attention=attention, rotary=rotary,
                              kernels=kernels)
    image_processor = providers.Singleton(assembly.image_processor, folder, model_facts, pixels, processing)
    video_processor = providers.Singleton(assembly.video_processor, folder, pixels, processing)


class FeatureStage(containers.DeclarativeContainer):
    """Stage 2: conditional feature extraction; per-image vision outputs cached by content."""

    features = providers.Dependency()            # FeaturesConfig
    cache = providers.Singleton(FeatureCache, features.provided.max_cached_images)


class DecoderStage(containers.DeclarativeContainer):
    """Stage 3: the text decoder, the output head, and the KV-cache backend."""

    model_config = providers.Dependency()        # the checkpoint's ModelConfig
    attention = providers.Dependency()
    rotary = providers.Dependency()
    kernels = providers.Dependency()
    kv_cache = providers.Dependency()

    text_model = providers.Factory(on_meta, TextModel, model_config.provided.text, attention=attention,
                                   rotary=rotary, kernels=kernels)
    head = providers.Factory(on_meta, output_head, model_config, kernels)


class RootContainer(containers.DeclarativeContainer):
    """Composes the core and the three stages into the loaded model, the processors and the pipeline."""

    config = providers.Dependency(instance_of=RootConfig)
    started = providers.Object(0.0)              # perf_counter() when the run began (load time is measured from it)
    core = providers.Container(CoreContainer, config=config)
    folder = providers.Singleton(assembly.checkpoint_folder, core.model_facts)
    model_config = core.model_facts.provided.config

    vision = providers.Container(VisionStage, processing=config.provided.processing,
                                 pixels=core.facts.provided.pixels, model_config=model_config.vision,
                                 model_facts=core.model_facts,
                                 folder=folder, attention=core.attention_guard, rotary=core.rotary_guard,
                                 kernels=core.kernels)
    features = providers.Container(FeatureStage, features=config.provided.features)
    decoder = providers.Container(DecoderStage, model_config=model_config, attention=core.attention_guard,
                                  rotary=core.rotary_guard, kernels=core.kernels, kv_cache=core.kv_cache)

    skeleton = providers.Factory(Qwen3VL, model_config, visual=vision.tower, language_model=decoder.text_model,
                                 lm_head=decoder.head, feature_cache=features.cache)
    loaded = providers.Singleton(assembly.load_model, skeleton, folder, core.kernels, core.memory,
                                 config.provided.model.dtype, config.provided.progress)
    kv_caches = providers.Singleton(assembly.KVCaches, core.kv_cache, loaded)

    tokenizer = providers.Singleton(assembly.checked_tokenizer, folder, model_config)
    processors = providers.Singleton(
        Processors, tokenizer=tokenizer, template=providers.Singleton(ChatTemplate.from_folder, folder),
        stop_ids=providers.Singleton(stop_token_ids, providers.Callable(read_generation_config, folder), tokenizer),
        images=vision.image_processor, videos=vision.video_processor.provider)

    # Runtime recovery re-points the guards, moves the placed model and the live KV caches, and notes it in the plan.
    recovery = providers.Singleton(Recovery, core.resolver, providers.Dict(attention=core.attention_guard,
                                                                           rotary=core.rotary_guard),
                                   loaded, kv_caches, core.plan)
    engine = providers.Singleton(Engine, loaded.provided.model, recovery)
    pipeline = providers.Singleton(Pipeline, config, loaded=loaded, processors=processors, caches=kv_caches,
                                   engine=engine, plan=core.plan, facts=core.facts, started=started)


def make_container(config: RootConfig) -> RootContainer:
    """A root container for one run of `config` (typed: the config enters exactly once)."""
    container = RootContainer(config=config)
    container.started.override(providers.Object(time.perf_counter()))
    return container
