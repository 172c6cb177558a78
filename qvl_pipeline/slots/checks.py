"""Public self-test checkers, one per slot: run a plugin and its slot's reference plugin on the same small random
inputs and raise SelfTestError when they disagree beyond the plugin's fidelity (or in shape or layout).

Every slot interface's default `self_test(reference)` calls its checker; plugin authors call them from their own
self-tests with other devices or dtypes.
"""

from __future__ import annotations

import torch
from torch import nn

from qvl_pipeline.slots.attention import AttentionBackend
from qvl_pipeline.slots.base import Fidelity, SelfTestError
from qvl_pipeline.slots.kernels import KernelsBackend
from qvl_pipeline.slots.kv_cache import CacheShape, KVCacheBackend
from qvl_pipeline.slots.memory import MemoryManager, model_bytes
from qvl_pipeline.slots.rotary import RotaryBackend
from qvl_pipeline.slots.selftest import check_close, check_each, failures_as_selftest_error

# (batch, heads, kv_heads, q_len, kv_len, head_dim, causal): decode, chunked decode, prefill, bidirectional.
ATTENTION_CASES: tuple[tuple[int, int, int, int, int, int, bool], ...] = (
    (1, 4, 2, 1, 9, 16, True),
    (1, 4, 2, 3, 9, 16, True),
    (2, 4, 2, 6, 6, 16, True),
    (1, 2, 2, 5, 5, 16, False),
)


def check_attention(plugin: AttentionBackend, reference: AttentionBackend, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> float:
    """`attend` over ATTENTION_CASES and `attend_varlen` over a two-segment pack, against `reference` in fp32
    on the CPU. Returns the worst relative error."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with failures_as_selftest_error(f"{type(plugin).__name__} self-test on {device} ({dtype})"):
        for b, h, kvh, q_len, kv_len, d, causal in ATTENTION_CASES:
            q, k, v = (torch.randn(b, n_heads, n, d, generator=gen)
                       for n_heads, n in ((h, q_len), (kvh, kv_len), (kvh, kv_len)))
            got = plugin.attend(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), causal=causal,
                                scale=d ** -0.5)
            want = reference.attend(q, k, v, causal=causal, scale=d ** -0.5)              # [b, q_len, h, d]
            what = f"attend(q_len={q_len}, kv_len={kv_len}, heads={h}/{kvh}, causal={causal})"
            worst = max(worst, check_close(what, got, want, plugin.fidelity, dtype))
        q, k, v = (torch.randn(2, 7, 16, generator=gen) for _ in range(3))
        bounds = torch.tensor([0, 3, 7])
        got = plugin.attend_varlen(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                                   bounds.to(device), scale=0.25)
        want = reference.attend_varlen(q, k, v, bounds, scale=0.25)                       # [7, 2, 16]
        worst = max(worst, check_close("attend_varlen(segments 3+4)", got, want, plugin.fidelity, dtype))
    return worst


def check_rotary(plugin: RotaryBackend, reference: RotaryBackend) -> float:
    """Text tables (also past a first table size), vision tables and `apply` in both precisions, on the CPU."""
    gen = torch.Generator().manual_seed(0)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 24, 2).float() / 24))                   # head_dim 24 -> 12 freqs
    worst = 0.0
    with failures_as_selftest_error(f"{type(plugin).__name__} self-test"):
        for seq, top in ((5, 40), (3, 700)):
            pos = torch.randint(0, top, (3, 2, seq), generator=gen)                       # [3, batch, seq]
            worst = max(worst, check_each(f"text_tables (positions < {top})", ("cos", "sin"),
                                          plugin.text_tables(pos, inv_freq, (4, 4, 4)),
                                          reference.text_tables(pos, inv_freq, (4, 4, 4)), plugin.fidelity))
        hw_pos = torch.randint(0, 30, (7, 2), generator=gen)                              # [patches, 2]
        worst = max(worst, check_each("vision_tables", ("cos", "sin"), plugin.vision_tables(hw_pos, inv_freq[:6]),
                                      reference.vision_tables(hw_pos, inv_freq[:6]), plugin.fidelity))
        q, k = torch.randn(2, 3, 5, 24, generator=gen), torch.randn(2, 1, 5, 24, generator=gen)
        cos, sin = reference.text_tables(torch.arange(5).expand(3, 2, 5), inv_freq, (4, 4, 4))
        cos, sin = cos[:, None], sin[:, None]                                              # [batch, 1, seq, d]
        for upcast in (True, False):
            worst = max(worst, check_each(f"apply(upcast={upcast})", ("q", "k"),
                                          plugin.apply(q, k, cos, sin, upcast=upcast),
                                          reference.apply(q, k, cos, sin, upcast=upcast), plugin.fidelity))
    return worst


def prepared_pair(plugin: KernelsBackend, reference: KernelsBackend, in_features: int, out_features: int,
                  gen: torch.Generator, device: torch.device | str = "cpu",
                  stored: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module]:
    """(the reference's linear with random weights, fp32 on the CPU; the same weights stored as `stored`, loaded
    into the plugin's linear and prepared, on `device`)."""
    want = reference.linear(in_features, out_features, True)
    with torch.no_grad():
        for p in want.parameters():
            p.copy_(torch.randn(p.shape, generator=gen).to(stored).float())
    mine = plugin.linear(in_features, out_features, True).to(stored)
    mine.load_state_dict({n: t.to(stored) for n, t in want.state_dict().items()})
    return want, plugin.prepare(mine).to(device)


def check_kernels(plugin: KernelsBackend, reference: KernelsBackend, device: torch.device | str = "cpu",
                  stored: torch.dtype = torch.float32, rows: tuple[int, ...] = (1, 5, 40)) -> float:
    """A linear through the plugin (prepared as after loading a checkpoint stored as `stored`) against the
    reference's fp32 linear with the same weights, for decode- and prefill-sized inputs."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with failures_as_selftest_error(f"{type(plugin).__name__} self-test on {device}"):
        want_linear, mine = prepared_pair(plugin, reference, 64, 48, gen, device, stored)
        for n in rows:
            x = torch.randn(n, 64, generator=gen)
            got = mine(x.to(device, plugin.compute_dtype(stored)))
            worst = max(worst, check_close(f"linear on {device}, {n} row(s)", got.float(), want_linear(x),
                                           plugin.fidelity))
    return max(worst, check_activations(plugin, reference, device, plugin.compute_dtype(stored)))


ACTIVATION_NAMES = ("silu", "gelu_pytorch_tanh")      # the decoder's and the vision tower's


def check_activations(plugin: KernelsBackend, reference: KernelsBackend, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32, fidelity: Fidelity | None = None) -> float:
    """The plugin's MLP activations on a temporary (which they may overwrite) against the reference's, within
    `fidelity` (default: the plugin's)."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    with failures_as_selftest_error(f"{type(plugin).__name__} activation self-test on {device}"):
        for name in ACTIVATION_NAMES:
            x = (torch.randn(5, 333, generator=gen) * 3).to(device, dtype)
            want = reference.activation(name)(x.clone()).float()
            got = plugin.activation(name)(x.clone()).float()
            worst = max(worst, check_close(f"activation {name} on {device} in {dtype}", got, want,
                                           fidelity or plugin.fidelity, dtype))
    return worst


KV_SHAPE = CacheShape(layers=2, batch=1, kv_heads=2, head_dim=8, max_len=12)
# (new positions appended by every layer, then advance?, then truncate to, then grow to): prefill, decode,
# a retry after an edit, a resize to a longer context, positions past the first size.
KV_SCRIPT: tuple[tuple[int, bool, int | None, int | None], ...] = (
    (5, True, None, None), (1, True, None, None), (3, False, 4, None), (3, True, None, 20), (9, True, None, None))


def check_kv_cache(plugin: KVCacheBackend, reference: KVCacheBackend, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> float:
    """Replay KV_SCRIPT on the plugin's cache and the reference's with the same random keys/values; keys, values
    and lengths must agree within the plugin's fidelity."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    devices = tuple(torch.device(device) for _ in range(KV_SHAPE.layers))
    with failures_as_selftest_error(f"{type(plugin).__name__} self-test on {device}"):
        mine = plugin.create(KV_SHAPE, dtype, devices)
        ref = reference.create(KV_SHAPE, dtype, devices)
        for step, (new, advance, truncate, grow) in enumerate(KV_SCRIPT):
            for cache in (mine, ref):
                if grow is not None:
                    cache.grow(grow)
            for layer in range(KV_SHAPE.layers):
                k, v = (torch.randn(1, 2, new, 8, generator=gen).to(device, dtype) for _ in range(2))
                worst = max(worst, check_each(f"step {step} layer {layer}", ("keys", "values"),
                                              mine.append(layer, k, v), ref.append(layer, k, v), plugin.fidelity,
                                              dtype))
            for cache in (mine, ref):
                if advance:
                    cache.advance(new)
                if truncate is not None:
                    cache.truncate(truncate)
            if mine.length != ref.length:
                raise SelfTestError(f"after step {step} length is {mine.length}, the reference's {ref.length}")
    return worst


def check_memory(plugin: MemoryManager, reference: MemoryManager) -> float:
    """A placement for the run's model: one device per decoder layer, each a device torch knows. (The reference
    places everything in RAM, which the plugin's budget may not hold: only the layer count is compared.)"""
    model = model_bytes(plugin.facts)        # in the weight format of the run's kernels plugin
    sizes = (list(model.layers), model.vision, model.embed, model.head)
    with failures_as_selftest_error(f"{type(plugin).__name__} self-test"):
        placement = plugin.place(*sizes)
        if len(placement.layers) != len(model.layers):
            raise SelfTestError(f"placed {len(placement.layers)} decoder layers; the model has {len(model.layers)}")
        for device in (placement.vision, placement.embed, placement.head, *placement.layers):
            torch.device(device)
    return 0.0
