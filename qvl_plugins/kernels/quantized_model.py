"""Swap a loaded model's linear layers for quantised ones, one tensor at a time, through an optional disk cache.

Plugin-independent: a `LinearFormat` says how one weight is quantised, which tensors it keeps, and how to rebuild
the module from them; `quantize_model` finds the targets (including a tied output head, which gets its own
quantised copy while the embedding keeps the exact table), quantises them with bounded memory, and reads or
writes the quantised tensors through a `CacheBinding` when one is given.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from qvl_pipeline.checkpoint.quant_cache import QuantCache, SourceCheckpoint, cache_key
from qvl_plugins.kernels.int4_linear import PLAIN, UNLIMITED_ROWS, Int4Linear, aten_layout, int4_layout
from qvl_plugins.kernels.int8_linear import Int8Linear
from qvl_plugins.kernels.native_gemv import INT4_TILED, Q4_TILE_ROWS, ROWS, TILED, Int4Decode, Int8Decode
from qvl_plugins.kernels.quantize import reused_block_buffers, trim_heap

HEAD = "lm_head"
VISION_TOWER = "visual"          # the vision tower's module name (model.visual.*)


def in_vision_tower(name: str) -> bool:
    """Whether the module `name` (dotted, from named_modules) is part of the vision tower."""
    return VISION_TOWER in name.split(".")
TensorSpec = tuple[tuple[int, ...], torch.dtype]


class LinearFormat(Protocol):
    """How one linear layer's weight is stored quantised."""

    name: str

    def params(self) -> dict[str, Any]:
        """Everything that changes the stored tensors (part of the cache key)."""
        ...

    def quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, release_source: bool) -> nn.Module: ...

    def state(self, module: nn.Module) -> dict[str, torch.Tensor]: ...

    def expected(self, out_features: int, in_features: int) -> dict[str, TensorSpec]: ...

    def restore(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None, in_features: int) -> nn.Module:
        ...


@dataclass(frozen=True)
class Int8Format:
    """Symmetric per-output-channel int8 (Int8Linear)."""

    pack_cpu: bool
    pack_max_rows: int
    decode: Int8Decode | None = None          # the native decode GEMV (not part of the stored tensors)
    name: str = "int8_per_channel"

    def params(self) -> dict[str, Any]:
        # The native decode GEMV stores its weights TILED (shapes that allow it): a different cache entry.
        return {"version": 1} if self._tiles is None else {"version": 1, "layout": TILED}

    @property
    def _tiles(self) -> Int8Decode | None:
        return self.decode if self.decode is not None and self.decode.activations == "int8" else None

    def layout(self, out_features: int, in_features: int) -> str:
        return self._tiles.layout(out_features, in_features) if self._tiles is not None else ROWS

    def quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, release_source: bool) -> nn.Module:
        return Int8Linear.quantize(weight, bias, pack_cpu=self.pack_cpu, pack_max_rows=self.pack_max_rows,
                                   decode=self.decode,
                                   release_source=release_source)

    def state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight_int8": module.weight_int8, "weight_scale": module.weight_scale}

    def expected(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        return {"weight_int8": ((out_features, in_features), torch.int8),
                "weight_scale": ((out_features,), torch.float32)}

    def restore(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None, in_features: int) -> nn.Module:
        weight = state["weight_int8"]
        return Int8Linear(weight, state["weight_scale"], bias, pack_cpu=self.pack_cpu,
                          pack_max_rows=self.pack_max_rows, decode=self.decode, layout=self.layout(*weight.shape))


@dataclass(frozen=True)
class Int4Format:
    """Group-wise asymmetric int4 (Int4Linear): INT4_TILED with a native `decode` GEMV, else ATen's CPU layout where
    `use_aten`, else plain (per shape: see int4_layout)."""

    group: int
    use_aten: bool
    decode: Int4Decode | None = None          # the native decode GEMV (its INT4_TILED layout is in params())
    pack_max_rows: int = UNLIMITED_ROWS       # ATen layout: inputs above this many rows dequantise and run the GEMM
    name: str = "int4_group_asym"

    def params(self) -> dict[str, Any]:
        # ATen's packed layout depends on the CPU capability and may change with the torch version.
        if self.decode is not None:
            layout = {"layout": INT4_TILED}
        elif self.use_aten:
            layout = {"layout": aten_layout(), "torch": torch.__version__}
        else:
            layout = {"layout": PLAIN}
        return {"version": 1, "group": self.group, **layout}

    def _layout(self, out_features: int, in_features: int) -> str:
        return int4_layout(out_features, in_features, self.group, self.use_aten, self.decode)

    def quantize(self, weight: torch.Tensor, bias: torch.Tensor | None, release_source: bool) -> nn.Module:
        return Int4Linear.quantize(weight, bias, group=self.group, use_aten=self.use_aten,
                                   release_source=release_source, decode=self.decode,
                                   pack_max_rows=self.pack_max_rows)

    def state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {"weight_int4": module.weight_int4, "weight_scale_zero": module.weight_scale_zero}

    def expected(self, out_features: int, in_features: int) -> dict[str, TensorSpec]:
        groups = in_features // self.group
        tiled = self._layout(out_features, in_features) == INT4_TILED
        scale_zero = (out_features // Q4_TILE_ROWS, groups, Q4_TILE_ROWS, 2) if tiled else (groups, out_features, 2)
        return {"weight_int4": ((out_features, in_features // 2), torch.uint8),
                "weight_scale_zero": (scale_zero, torch.bfloat16)}

    def restore(self, state: Mapping[str, torch.Tensor], bias: torch.Tensor | None, in_features: int) -> nn.Module:
        out_features = state["weight_int4"].shape[0]
        return Int4Linear(state["weight_int4"], state["weight_scale_zero"], bias, in_features=in_features,
                          group=self.group, layout=self._layout(out_features, in_features), decode=self.decode,
                          pack_max_rows=self.pack_max_rows)


@dataclass
class Target:
    """One weight to quantise: where the new module goes, where the weight comes from, in which format."""

    name: str                       # module path in the model ("lm_head" also for a tied head)
    source: str                     # checkpoint name of the weight (the embedding's for a tied head)
    module: nn.Module | None        # the module holding the weight (the embedding for a tied head); None once used
    fmt: LinearFormat
    shape: tuple[int, int]          # (out_features, in_features)
    has_bias: bool

    @classmethod
    def of(cls, name: str, source: str, module: nn.Module, fmt: LinearFormat, has_bias: bool) -> Target:
        out_f, in_f = module.weight.shape
        return cls(name, source, module, fmt, (int(out_f), int(in_f)), has_bias)


@dataclass(frozen=True)
class CacheBinding:
    """Where quantised tensors of one source checkpoint are cached."""

    cache: QuantCache
    source: SourceCheckpoint

    @classmethod
    def for_checkpoint(cls, folder: str | Path, cache_dir: str | Path) -> CacheBinding:
        return cls(QuantCache(cache_dir), SourceCheckpoint.read(folder))


def find_targets(model: nn.Module, quantizable: Callable[[nn.Module], bool],
                 format_for: Callable[[str, nn.Module], LinearFormat | None],
                 head_format: LinearFormat | None) -> list[Target]:
    """The model's quantisable linears (in module order) with their formats; the output head in `head_format`
    (None: left as it is), also when it is tied to the token embedding (`lm_head` is None)."""
    targets: list[Target] = []
    for name, module in model.named_modules():
        if not quantizable(module):
            continue
        fmt = head_format if name.rpartition(".")[2] == HEAD else format_for(name, module)
        if fmt is not None:
            targets.append(Target.of(name, f"{name}.weight" if name else "weight", module, fmt,
                                     module.bias is not None))
    if head_format is not None and getattr(model, HEAD, False) is None:
        embeddings = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Embedding)
                      and n.rpartition(".")[2] == "embed_tokens"]
        if embeddings:
            name, embedding = embeddings[-1] if len(embeddings) == 1 else _text_embedding(embeddings)
            targets.append(Target.of(HEAD, f"{name}.weight", embedding, head_format, False))
    return targets


def _text_embedding(embeddings: list[tuple[str, nn.Module]]) -> tuple[str, nn.Module]:
    for name, module in embeddings:
        if "language_model" in name:
            return name, module
    return embeddings[0]


def _set(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
    return model


def _cache_plan(targets: list[Target], binding: CacheBinding) -> tuple[str, dict[str, TensorSpec]] | None:
    """(key, expected tensors) when every target's weight is the checkpoint's own tensor of that name and shape;
    None otherwise (e.g. a self-test's lone layer, which must neither read nor write the cache)."""
    if not targets:
        return None
    expected: dict[str, TensorSpec] = {}
    described = []
    for t in targets:
        stored = binding.source.tensors.get(t.source)
        if stored is None or tuple(stored[1]) != t.shape:
            return None
        for key, spec in t.fmt.expected(*t.shape).items():
            expected[f"{t.name}.{key}"] = spec
        described.append([t.name, t.source, list(t.shape), t.fmt.name])
    formats = {t.fmt.name: t.fmt.params() for t in targets}
    return cache_key(binding.source.fingerprint, "linears", {"formats": formats, "targets": described}), expected


def _quantize_into_cache(targets: list[Target], binding: CacheBinding, key: str,
                         expected: dict[str, TensorSpec]) -> dict[str, torch.Tensor] | None:
    """Quantise each target straight into a new cache entry (only one target's result in memory at a time) and
    map the finished entry; None (with a warning) when the entry cannot be written or read back."""
    meta = {"source": str(binding.source.folder), "targets": len(targets)}
    try:
        writer = binding.cache.writer(key, expected, meta)
    except OSError as exc:
        warnings.warn(f"quantised weights not cached ({exc}); the next start quantises again", stacklevel=3)
        return None
    try:
        with reused_block_buffers():
            for t in targets:
                bias = t.module.bias if t.has_bias else None
                module = t.fmt.quantize(t.module.weight, bias, release_source=True)
                for k, v in t.fmt.state(module).items():
                    writer.write(f"{t.name}.{k}", v)
                del module
                trim_heap()
        writer.commit()
    except OSError as exc:
        writer.abort()
        warnings.warn(f"quantised weights not cached ({exc}); the next start quantises again", stacklevel=3)
        return None
    state = binding.cache.load(key, expected)
    if state is None:
        warnings.warn(f"the cache entry {binding.cache.entry(key)} just written does not read back", stacklevel=3)
    return state


def quantize_model(model: nn.Module, targets: list[Target], cache: CacheBinding | None = None) -> nn.Module:
    """Replace every target by its quantised module; returns the model (or the new module when the model itself
    is the only target). Source weights that are memory-mapped have their pages released as they are consumed.

    With `cache` (and targets that are the checkpoint's own tensors): a complete entry is mapped instead of
    quantising; without one, each target is quantised straight into a new entry, which is then mapped, so the first
    start holds no more quantised weights in memory than the second. When the entry cannot be written the
    quantised weights stay in memory (with a warning)."""
    plan = _cache_plan(targets, cache) if cache is not None else None
    if plan is not None:
        key, expected = plan
        state = cache.cache.load(key, expected)
        if state is None:
            state = _quantize_into_cache(targets, cache, key, expected)
        if state is not None:
            for t in targets:
                part = {k.removeprefix(f"{t.name}."): v for k, v in state.items() if k.startswith(f"{t.name}.")}
                bias = t.module.bias if t.has_bias else None
                model = _set(model, t.name, t.fmt.restore(part, bias, t.shape[1]))
                t.module = None
            return model
    with reused_block_buffers():
        for t in targets:
            bias = t.module.bias if t.has_bias else None
            module = t.fmt.quantize(t.module.weight, bias, release_source=True)
            model = _set(model, t.name, module)
            t.module = None                 # the source weight is dropped as soon as nothing else holds it
            trim_heap()
    return model
