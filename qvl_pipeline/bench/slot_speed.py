"""Speed of a slot's candidate plugins at a model's real shapes on this machine (what task=tune orders chains by).

Each candidate is measured through the slot's public API, as the model calls it:
- kernels: the plugin's own linear layer, loaded with random weights in the checkpoint's stored dtype and prepared
  (quantised, repacked) by the plugin, for every distinct linear shape of the decoder and the output head: a decode
  GEMV (1 row; cycling through enough copies of the weights to overflow the last-level cache, as in
  `qvl_pipeline.bench.kernels`) and a prefill GEMM (PREFILL_ROWS rows; the head sees one row).
- attention: `attend` at the decoder's head shapes, a decode step (1 query over DECODE_CONTEXT keys) and a causal
  prefill of PREFILL_ROWS positions.
- rotary: `text_tables` + `apply` for a decode step and for a prefill.
Each candidate gets a score: the time of one typical request, a PREFILL_ROWS-position prefill plus DECODE_TOKENS
decoded tokens (fastest first). The best call of each measurement counts (on a shared machine the uncontended one).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qvl_pipeline.bench.kernels import MAX_COPIES, ROTATE_BYTES, time_calls
from qvl_pipeline.facts import RunFacts
from qvl_pipeline.model.qwen3_vl import output_head
from qvl_pipeline.model.text import TextModel, text_inv_freq
from qvl_pipeline.slots import AttentionBackend, KernelsBackend, RotaryBackend

PREFILL_ROWS = 256             # positions of a typical prompt: one image (~200 tokens) and a question
DECODE_TOKENS = 128            # tokens of a typical answer
DECODE_CONTEXT = PREFILL_ROWS + DECODE_TOKENS // 2    # keys a decode step attends to, on average
# Relative speed difference below which two candidates count as equally fast (a shared machine's run-to-run noise
# is 10-30 %; a difference of a few % says nothing): the profile's order then stands.
NOISE_MARGIN = 0.1
MAX_ITERS = 200                # calls per measurement at most (a slow candidate stops at min_time)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Shape = tuple[int, int, bool]            # (in_features, out_features, bias)


@dataclass
class Measured:
    """One candidate's measurements: `score` is the estimated seconds of a typical request (lower is faster)."""

    plugin: str
    score: float
    decode_ms: float               # per decoded token (kernels: all decoder linears + head; others: per layer)
    prefill_ms: float              # one PREFILL_ROWS-position prefill (same scope)
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"plugin": self.plugin, "request_s": round(self.score, 6), "decode_ms": round(self.decode_ms, 4),
                "prefill_ms": round(self.prefill_ms, 4), **self.detail}


def request_seconds(prefill_ms: float, decode_ms: float) -> float:
    """The cost model: one prefill plus DECODE_TOKENS decode steps, in seconds."""
    return (prefill_ms + DECODE_TOKENS * decode_ms) / 1e3


def _best_ms(calls: list[Callable[[], Any]], min_time: float) -> float:
    best, _median, _n = time_calls(calls, min_time, MAX_ITERS)
    return best * 1e3


# ---- kernels ---------------------------------------------------------------------------------------------------

def decoder_linears(facts: RunFacts, reference: KernelsBackend, attention: AttentionBackend,
                    rotary: RotaryBackend) -> tuple[Counter[Shape], Shape]:
    """(how many linears of each shape one decoder pass runs, the output head's shape), read from the decoder the
    model code builds (on the meta device, with the reference plugins)."""
    config = facts.model.config
    with torch.device("meta"):
        text = TextModel(config.text, attention=attention, rotary=rotary, kernels=reference)
        head = output_head(config, reference)
    counts: Counter[Shape] = Counter((m.in_features, m.out_features, m.bias is not None)
                                     for m in text.modules() if isinstance(m, nn.Linear))
    head_shape = (config.text.hidden_size, config.text.vocab_size, False) if head is None else \
        (head.in_features, head.out_features, head.bias is not None)
    return counts, head_shape


def _prepared_linear(plugin: KernelsBackend, shape: Shape, source: dict[str, torch.Tensor]) -> nn.Module:
    """The plugin's linear holding (a copy of) `source`, prepared as after loading a checkpoint."""
    in_f, out_f, bias = shape
    with torch.device("meta"):
        module = plugin.linear(in_f, out_f, bias)
    module.load_state_dict({name: t.clone() for name, t in source.items()}, assign=True)
    return plugin.prepare(module).eval()


def _module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def _time_linear(plugin: KernelsBackend, shape: Shape, stored: torch.dtype, act: torch.dtype,
                 gen: torch.Generator, min_time: float, prefill: bool) -> tuple[float, float, int]:
    """(decode ms, prefill ms or 0.0 when not `prefill`, prepared weight bytes) of one linear shape."""
    in_f, out_f, bias = shape
    source = {"weight": (torch.randn(out_f, in_f, generator=gen) * 0.02).to(stored)}           # [out, in]
    if bias:
        source["bias"] = torch.zeros(out_f, dtype=stored)
    first = _prepared_linear(plugin, shape, source)
    nbytes = _module_bytes(first)
    copies = [first] + [_prepared_linear(plugin, shape, source)
                        for _ in range(min(MAX_COPIES, math.ceil(ROTATE_BYTES / max(nbytes, 1))) - 1)]
    del source
    one = torch.randn(1, in_f, generator=gen).to(act)                             # [1, in]
    rows = torch.randn(PREFILL_ROWS, in_f, generator=gen).to(act)                 # [PREFILL_ROWS, in]
    with torch.inference_mode():
        step = _best_ms([lambda m=m: m(one) for m in copies], min_time)
        del copies[1:]
        full = _best_ms([lambda: first(rows)], min_time) if prefill else 0.0
    return step, full, nbytes


def measure_kernels(plugin: KernelsBackend, facts: RunFacts, counts: Counter[Shape], head: Shape,
                    min_time: float) -> Measured:
    """Decode and prefill time of every decoder linear shape and the head through `plugin`, summed per token."""
    stored = DTYPES[facts.model.stored_dtype]
    act = plugin.compute_dtype(stored)
    gen = torch.Generator().manual_seed(0)
    decode_ms = prefill_ms = 0.0
    read_bytes = 0
    shapes: dict[str, Any] = {}
    for shape in dict.fromkeys([*counts, head]):          # distinct shapes (the head may share a layer's)
        layer_n, is_head = counts[shape], shape == head
        step, full, nbytes = _time_linear(plugin, shape, stored, act, gen, min_time, prefill=layer_n > 0)
        decode_ms += (layer_n + is_head) * step
        prefill_ms += layer_n * full + (step if is_head else 0.0)   # a prefill sends one row through the head
        read_bytes += (layer_n + is_head) * nbytes
        shapes[f"{shape[0]}x{shape[1]}" + (" (head)" if is_head else "")] = {
            "per_token": layer_n + is_head, "weight_bytes": nbytes, "decode_ms": round(step, 4),
            "gb_s": round(nbytes / (step / 1e3) / 1e9, 2), "prefill_ms": round(full, 4) if layer_n else None}
    gb_s = read_bytes / (decode_ms / 1e3) / 1e9 if decode_ms else 0.0
    return Measured(plugin.name, request_seconds(prefill_ms, decode_ms), decode_ms, prefill_ms,
                    {"weight_bytes_per_token": read_bytes, "gb_s": round(gb_s, 2), "compute_dtype": str(act)
                     .removeprefix("torch."), "shapes": shapes})


# ---- attention --------------------------------------------------------------------------------------------------

def measure_attention(plugin: AttentionBackend, facts: RunFacts, dtype: torch.dtype, min_time: float) -> Measured:
    """One layer's attention: a decode step over DECODE_CONTEXT keys and a causal PREFILL_ROWS prefill."""
    text = facts.model.config.text
    heads, kv_heads, dim = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    gen = torch.Generator().manual_seed(0)

    def qkv(q_len: int, kv_len: int) -> tuple[torch.Tensor, ...]:
        return tuple(torch.randn(1, h, n, dim, generator=gen).to(dtype)
                     for h, n in ((heads, q_len), (kv_heads, kv_len), (kv_heads, kv_len)))

    scale = dim ** -0.5
    dq, dk, dv = qkv(1, DECODE_CONTEXT)
    pq, pk, pv = qkv(PREFILL_ROWS, PREFILL_ROWS)
    with torch.inference_mode():
        decode = _best_ms([lambda: plugin.attend(dq, dk, dv, causal=True, scale=scale)], min_time)
        prefill = _best_ms([lambda: plugin.attend(pq, pk, pv, causal=True, scale=scale)], min_time)
    return Measured(plugin.name, request_seconds(prefill, decode) * text.num_hidden_layers, decode, prefill,
                    {"per": "layer", "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
                     "decode_context": DECODE_CONTEXT, "dtype": str(dtype).removeprefix("torch.")})


# ---- rotary -----------------------------------------------------------------------------------------------------

def measure_rotary(plugin: RotaryBackend, facts: RunFacts, dtype: torch.dtype, min_time: float) -> Measured:
    """The decoder's rotary per forward: the tables once, `apply` once per layer; a decode step (positions move
    on by one each call) and a PREFILL_ROWS prefill."""
    text = facts.model.config.text
    layers, heads, kv_heads, dim = text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads, \
        text.head_dim
    inv_freq, section = text_inv_freq(text), text.mrope_section
    gen = torch.Generator().manual_seed(0)

    def forward(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> None:
        cos, sin = plugin.text_tables(positions, inv_freq, section)              # [1, seq, dim]
        cos, sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]
        for _ in range(layers):
            plugin.apply(q, k, cos, sin, upcast=False)

    def qk(seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.randn(1, heads, seq, dim, generator=gen).to(dtype),
                torch.randn(1, kv_heads, seq, dim, generator=gen).to(dtype))

    q1, k1 = qk(1)
    qp, kp = qk(PREFILL_ROWS)
    steps = [torch.full((3, 1, 1), PREFILL_ROWS + i, dtype=torch.long) for i in range(DECODE_TOKENS)]
    prompt = torch.arange(PREFILL_ROWS).expand(3, 1, PREFILL_ROWS)
    with torch.inference_mode():
        decode = _best_ms([lambda p=p: forward(p, q1, k1) for p in steps], min_time)
        prefill = _best_ms([lambda: forward(prompt, qp, kp)], min_time)
    return Measured(plugin.name, request_seconds(prefill, decode), decode, prefill,
                    {"per": f"decoder forward ({layers} layers)", "dtype": str(dtype).removeprefix("torch.")})


def ordered_chain(chain: Sequence[str], scores: Mapping[str, float], margin: float = NOISE_MARGIN) -> tuple[str, ...]:
    """The chain with its measured entries ranked by score into the places measured entries held; entries without
    a score keep their place, so the result is a permutation of `chain` (pure). A measured entry moves ahead of an
    earlier one only when it is faster by more than `margin` (a relative difference): nearer than that, the
    measurement cannot tell them apart and the profile's order stands."""
    places = [i for i, name in enumerate(chain) if name in scores]
    ranked: list[str] = []
    for name in (n for n in chain if n in scores):
        ahead_of = next((i for i, other in enumerate(ranked) if scores[other] > scores[name] * (1 + margin)),
                        len(ranked))
        ranked.insert(ahead_of, name)
    out = list(chain)
    for place, name in zip(places, ranked, strict=True):
        out[place] = name
    return tuple(out)
