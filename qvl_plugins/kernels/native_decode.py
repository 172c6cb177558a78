"""The decoder stack of a decode step in one native call (native/qvl_gemv.c `qvl_decode_layers`).

A decode step through the per-op path dispatches ~15 Python-level ops per layer (module calls, views, the native
norms, rotary, projections and attention one call each, residual adds, SiLU · up): measured ~6 ms of a ~49 ms 2B
token at `opt=moderate` on the 2-core VM, whose GEMVs already run at the RAM bandwidth. When every layer's parts
are the native ones (int8 or int4 tiled weights with the native decode GEMV, native norms, the native attention
and rotary plugins, all on the CPU), the whole stack runs in one call that uses the same kernels, so each of those
steps gives the same bits; only SiLU's exp is the library's own instead of torch's (last-bit fp32 differences that can
round a product to the neighbouring bf16). Everything else, and any step it does not take (batch > 1, another
dtype, a cache it does not know, a plugin moved down its chain at run time, a forward hook on a layer, such as the
non-finite diagnosis sets), goes through the per-op path.
"""

from __future__ import annotations

import ctypes
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules import module as module_hooks

from qvl_pipeline.slots import KVCache
from qvl_plugins.attention.native import NativeAttention
from qvl_plugins.kernels.int4_linear import Int4Linear
from qvl_plugins.kernels.int8_linear import Int8Linear
from qvl_plugins.kernels.native_gemv import _DTYPE_FLAG, ELEM_MAX, NativeBuild, native_dtype_ok
from qvl_plugins.kernels.native_norm import NativeRMSNorm
from qvl_plugins.kv_cache.capacity import check_capacity
from qvl_plugins.kv_cache.int8 import Int8KVCacheStore
from qvl_plugins.kv_cache.static import StaticKVCache
from qvl_plugins.rotary.native import NativeRotary

_ptr, _i64 = ctypes.c_void_p, ctypes.c_int64
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")   # qvl_decode_layer.w


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _ptr), ("mlp_norm", _ptr), ("q_norm", _ptr), ("k_norm", _ptr),
                ("w", _ptr * 7), ("s", _ptr * 7), ("k_cache", _ptr), ("v_cache", _ptr),
                ("k_scale", _ptr), ("v_scale", _ptr)]


class _Shape(ctypes.Structure):
    _fields_ = [("hidden", _i64), ("heads", _i64), ("kv_heads", _i64), ("head_dim", _i64), ("inter", _i64),
                ("group", _i64), ("position", _i64), ("kv_strides", _i64 * 3), ("scale_strides", _i64 * 3),
                ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("bf16", ctypes.c_int),
                ("weights_int4", ctypes.c_int), ("kv_int8", ctypes.c_int), ("threads", ctypes.c_int)]


def _unguarded(plugin: object) -> object:
    """The plugin a slot guard currently points at (the object itself when it is no guard)."""
    return getattr(plugin, "_target", plugin)


def _hooked(layers: Sequence[nn.Module]) -> bool:
    """Whether a forward hook would see these layers run (on a layer, or global): the per-op path must run them."""
    return bool(module_hooks._global_forward_hooks or module_hooks._global_forward_pre_hooks
                or any(layer._forward_hooks or layer._forward_pre_hooks for layer in layers))


def projections(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's linears in PROJECTIONS order."""
    attn, mlp = layer.self_attn, layer.mlp
    return [getattr(attn if name in PROJECTIONS[:4] else mlp, name) for name in PROJECTIONS]


def _why_not_linears(linears: Sequence[nn.Module], build: NativeBuild) -> str:
    """Why these projections cannot run in the fused step ("" when they can)."""
    first = linears[0]
    kind = next((k for k in (Int8Linear, Int4Linear) if isinstance(first, k)), None)
    if kind is None:
        return f"the projections are {type(first).__name__}, not the native int8 / int4 ones"
    for lin in linears:
        # an int8 TILED layout implies the int8 x int8 decode GEMV (Int8Decode.layout), the one the fused step calls
        if not isinstance(lin, kind) or not lin.joins_native_call:
            return f"a projection is not an {kind.__name__} in the native tiled layout (or has a bias)"
        if kind is Int4Linear and lin.group != first.group:
            return "the int4 projections have different group sizes"
        if lin._native.build is not build:
            return "the projections run on different native builds"
    return ""


@dataclass
class NativeDecodeStack:
    """The fused decode step over `layers` (a TextModel's decoder layers) with the given plugins' guards."""

    build: NativeBuild
    layers: Sequence[nn.Module]
    attention: object             # the attention slot's guard (or plugin), re-checked every step
    rotary: object
    dtype: torch.dtype
    int4: bool

    def __post_init__(self) -> None:
        attn = self.layers[0].self_attn
        mlp = self.layers[0].mlp
        self._dims = (attn.o_proj.out_features, attn.heads, attn.kv_heads, attn.head_dim, mlp.down_proj.in_features)
        self._group = attn.q_proj.group if self.int4 else 0
        self._eps = self.layers[0].input_layernorm.eps
        self._scale = attn.scale
        self._table = (_Layer * len(self.layers))()
        self.failure = ""             # set when the native call failed: the step is not taken again
        for row, layer in zip(self._table, self.layers, strict=True):
            a = layer.self_attn
            row.attn_norm, row.mlp_norm = layer.input_layernorm.weight.data_ptr(), \
                layer.post_attention_layernorm.weight.data_ptr()
            row.q_norm, row.k_norm = a.q_norm.weight.data_ptr(), a.k_norm.weight.data_ptr()
            for i, lin in enumerate(projections(layer)):
                row.w[i] = (lin.weight_int4 if self.int4 else lin.weight_int8).data_ptr()
                row.s[i] = (lin.weight_scale_zero if self.int4 else lin.weight_scale).data_ptr()

    def _point_at(self, cache: KVCache) -> tuple[tuple[int, ...], tuple[int, ...], bool] | None:
        """Point the table at `cache`'s buffers (every step: a request's cache may be new, grown or moved) ->
        (kv strides, scale strides, int8), or None for a cache this step does not know (only the built-in static and
        int8 caches, exactly: a subclass may append differently)."""
        if type(cache) is Int8KVCacheStore and cache.dtype == self.dtype:
            keys, values, key_scales, value_scales = cache.keys, cache.values, cache.key_scales, cache.value_scales
            stored = torch.int8
        elif type(cache) is StaticKVCache:
            keys, values, key_scales, value_scales = cache.keys, cache.values, None, None
            stored = self.dtype
        else:
            return None
        if len(keys) != len(self.layers) or any(t.dtype != stored or t.device.type != "cpu" or t.stride(-1) != 1
                                                for t in (keys[0], keys[-1], values[0], values[-1])):
            return None
        for row, k, v in zip(self._table, keys, values, strict=True):
            row.k_cache, row.v_cache = k.data_ptr(), v.data_ptr()
        if key_scales is None:
            return keys[0].stride()[:3], (0, 0, 0), False
        for row, ks, vs in zip(self._table, key_scales, value_scales, strict=True):
            row.k_scale, row.v_scale = ks.data_ptr(), vs.data_ptr()
        return keys[0].stride()[:3], key_scales[0].stride()[:3], True

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 cache: KVCache) -> torch.Tensor | None:
        """x [1, 1, hidden] through every layer, the new position appended to `cache` (not advanced) -> the
        stack's output [1, 1, hidden], or None when this step is not one the fused call takes."""
        # cos, sin [1, 1, 1, head_dim]
        if (self.failure or x.shape[:2] != (1, 1) or x.dtype != self.dtype or x.device.type != "cpu"
                or cos.dtype != self.dtype or not isinstance(_unguarded(self.attention), NativeAttention)
                or not isinstance(_unguarded(self.rotary), NativeRotary) or torch.is_grad_enabled()):
            return None
        if _hooked(self.layers):
            return None
        where = self._point_at(cache)
        if where is None:
            return None
        kv_strides, scale_strides, int8 = where
        check_capacity(cache.shape.max_len, cache.length + 1)
        hidden, heads, kv_heads, head_dim, inter = self._dims
        shape = _Shape(hidden, heads, kv_heads, head_dim, inter, self._group, cache.length, (_i64 * 3)(*kv_strides),
                       (_i64 * 3)(*scale_strides), self._eps, self._scale, _DTYPE_FLAG[self.dtype], int(self.int4),
                       int(int8), torch.get_num_threads())
        out = x.contiguous().clone()
        c, s = cos.contiguous(), sin.contiguous()
        rc = self.build.lib.qvl_decode_layers(ctypes.addressof(self._table), len(self.layers),
                                              ctypes.addressof(shape), c.data_ptr(), s.data_ptr(), out.data_ptr())
        if rc:      # nothing is committed (the cache is not advanced): the per-op path redoes this step and all later
            self.failure = (f"native decode step failed with code {rc} ({len(self.layers)} layers, hidden {hidden}, "
                            f"position {cache.length}); decode steps run per op from now on")
            warnings.warn(self.failure, RuntimeWarning, stacklevel=2)
            return None
        return out


def native_decode_step(layers: Sequence[nn.Module], dtype: torch.dtype) -> tuple[NativeDecodeStack | None, str]:
    """The fused decode step for these prepared, placed decoder layers computing in `dtype`, or None with the
    reason it does not apply."""
    if not layers:
        return None, "no decoder layers"
    if not native_dtype_ok(dtype):
        return None, f"activations in {dtype}, not bf16 / fp32"
    first = layers[0].self_attn.q_proj
    native = getattr(first, "_native", None)
    build: NativeBuild | None = getattr(native, "build", None)
    if build is None or build.lib is None:
        return None, "the projections do not run on the native decode GEMV"
    attention, rotary = layers[0].self_attn._attention, layers[0].self_attn._rotary
    if first.in_features > ELEM_MAX:
        return None, f"hidden size {first.in_features} > {ELEM_MAX}, the native norms' longest row"
    if not isinstance(_unguarded(attention), NativeAttention):
        return None, f"attention={getattr(attention, 'name', '?')}, not native"
    if not isinstance(_unguarded(rotary), NativeRotary):
        return None, f"rotary={getattr(rotary, 'name', '?')}, not native"
    for layer in layers:
        where = f"layer {layer.self_attn.layer}"
        norms = (layer.input_layernorm, layer.post_attention_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm)
        if not all(isinstance(n, NativeRMSNorm) and n._native and n._build is build and n.weight.dtype == dtype
                   for n in norms):
            return None, f"{where}: a norm is not the native one in {dtype}"
        why = _why_not_linears(projections(layer), build)
        if why:
            return None, f"{where}: {why}"
        if any(m._forward_hooks or m._forward_pre_hooks for m in layer.modules()):
            return None, f"{where} has forward hooks (they must see it run)"
        if any(t.device.type != "cpu" for t in (*layer.parameters(), *layer.buffers())):
            return None, f"{where} is not on the CPU"
        if layer.self_attn._attention is not attention or layer.self_attn._rotary is not rotary:
            return None, f"{where} has another attention or rotary plugin"
    return NativeDecodeStack(build, layers, attention, rotary, dtype, isinstance(first, Int4Linear)), ""
