"""The decode loop: prefill, sample, decode step by step over the KV cache; streamed, stoppable, and
retried from preserved state when a plugin fails or memory runs out at run time."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from qvl_pipeline.errors import MemoryBudgetExceeded, NumericsError, PluginError, PluginRuntimeError
from qvl_pipeline.generation.sampling import Sampler
from qvl_pipeline.model.fusion import Fused
from qvl_pipeline.model.qwen3_vl import Qwen3VL
from qvl_pipeline.slots import KVCache

MAX_RECOVERIES = 8
T = TypeVar("T")

# Out-of-memory failures a step may raise outside any slot guard (a linear's weights, a cache buffer, a memory
# plugin's budget check); torch.cuda.OutOfMemoryError is torch.OutOfMemoryError on current torch.
OUT_OF_MEMORY: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, MemoryBudgetExceeded)
# What a step may fail with and still be retried after a recovery.
RETRYABLE: tuple[type[BaseException], ...] = (PluginRuntimeError, *OUT_OF_MEMORY)

# Called with a runtime failure and the step it interrupted: moves the failing slot along its chain or shrinks the
# GPU share, and says what it did (raises PluginError when a chain is exhausted, the failure when nothing applies).
Recover = Callable[[BaseException, str], str]


def describe_failure(failure: BaseException) -> str:
    """One line for a runtime failure."""
    if isinstance(failure, PluginRuntimeError):
        return str(failure)
    lines = str(failure).strip().splitlines()
    return f"{type(failure).__name__}: {lines[0] if lines else ''}"


@dataclass
class Outcome:
    tokens: list[int] = field(default_factory=list)
    stop_reason: str = ""          # eos | max_new_tokens | context_full
    prefill_s: float = 0.0
    decode_s: float = 0.0
    recoveries: list[str] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = max(0, len(self.tokens) - 1)          # the first token comes from the prefill
        return round(steps / self.decode_s, 3) if steps and self.decode_s > 0 else 0.0


def feed(model: Qwen3VL, fused: Fused, start: int, cache: KVCache) -> torch.Tensor:
    """Prefill positions start.. of `fused` (the cache already holds 0..start); returns logits [vocab]."""
    mask = fused.visual_mask
    deepstack = fused.deepstack
    if start and mask is not None and deepstack is not None:
        skip = int(mask[:, :start].sum())
        deepstack = [d[skip:] for d in deepstack]
    logits = model.forward_decoder(fused.inputs_embeds[:, start:], fused.position_ids[..., start:], cache,
                                   None if mask is None else mask[:, start:], deepstack, last_only=True)
    return logits[0, -1]


def with_recovery(step: Callable[[], T], recover: Recover, log: list[str],
                  before_retry: Callable[[], None] = lambda: None, where: str = "a step") -> T:
    """Run `step`; after a runtime failure (a plugin's, or out of memory) restore state, let `recover` move a slot
    along its chain or shrink the GPU share, and retry. `log` gets one line per recovery."""
    for _ in range(MAX_RECOVERIES):
        try:
            return step()
        except RETRYABLE as failure:
            log.append(f"{where}: {describe_failure(failure)}")
            before_retry()
            log[-1] += f"; {recover(failure, where)}"
    raise PluginError(f"gave up after {MAX_RECOVERIES} runtime recoveries: {log[-1]}",
                      "choose plugins explicitly (see task=plan) or report the failing plugin")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in `t`. The sum of the logits is non-finite whenever one of them is (one pass, ~1/30 of the
    cost of isfinite().all() over a 151,936-entry vocabulary); only a non-finite sum is checked element-wise (a
    sum can also overflow from huge finite values)."""
    if not t.is_floating_point():
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def first_nonfinite_part(model: Qwen3VL, rerun: Callable[[], torch.Tensor],
                         inputs: Callable[[], torch.Tensor] | None = None) -> str:
    """Where a step first goes non-finite: reruns it with a hook on every decoder layer (diagnosis after a failure,
    never on the hot path). `inputs`: the step's input embeddings, when known. Returns a phrase for the message."""
    try:
        embeds = inputs() if inputs is not None else None
    except Exception:
        embeds = None
    if embeds is not None and not _all_finite(embeds):
        return "its input embeddings (token embeddings or vision features) already hold NaN/Inf"
    try:
        layers = list(model.model.language_model.layers)
    except AttributeError:
        return ""
    bad: list[int] = []

    def hook(index: int) -> Callable[..., None]:
        def check(module: torch.nn.Module, args: object, output: object) -> None:
            out = output[0] if isinstance(output, (tuple, list)) else output
            if not bad and isinstance(out, torch.Tensor) and not _all_finite(out):
                bad.append(index)
        return check

    handles = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        rerun()
    except Exception:                  # the diagnosis is best effort: the error it annotates is the news
        return ""
    finally:
        for handle in handles:
            handle.remove()
    if bad:
        return f"the first non-finite output is decoder layer {bad[0]} (of {len(layers)})"
    return f"every decoder layer's output is finite (all {len(layers)}): the final norm or the output head is not"


class Engine:
    """Runs one generation for a prepared prompt."""

    def __init__(self, model: Qwen3VL, recover: Recover) -> None:
        self.model = model
        self.recover = recover

    def _retrying(self, cache: KVCache, step: Callable[[], torch.Tensor], outcome: Outcome, where: str,
                  inputs: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """The step's logits, retried from preserved state after a plugin failure; NumericsError when they are not
        all finite (NaN/Inf weights or an overflowing dtype would otherwise emit token 0 forever, or crash the
        sampler): the step is rerun once from the same state to name the first decoder layer that goes wrong."""
        length = cache.length                    # preserved state: what the cache held before the step
        logits = with_recovery(step, self.recover, outcome.recoveries, lambda: cache.truncate(length), where)
        if _all_finite(logits):
            return logits
        cache.truncate(length)
        part = first_nonfinite_part(self.model, step, inputs)
        cache.truncate(length)
        raise NumericsError(
            f"the model computed non-finite logits (NaN/Inf) at {where}" + (f"; {part}" if part else ""),
            "the weights hold NaN/Inf or the compute dtype overflows: check the checkpoint, try model.dtype=float32 "
            "or opt=minimal")

    def run(self, fused: Fused, cache: KVCache, *, context_ids: Sequence[int], start: int, sampler: Sampler,
            max_new_tokens: int, stop_ids: Sequence[int], on_token: Callable[[int], None] | None = None,
            recoveries: Sequence[str] = ()) -> Outcome:
        """Generate after the prompt in `fused` (positions from `start` are not yet cached)."""
        outcome = Outcome(recoveries=list(recoveries))
        stops = set(stop_ids)
        seen = list(context_ids)
        t0 = time.perf_counter()
        logits = self._retrying(cache, lambda: feed(self.model, fused, start, cache), outcome,
                                f"the prefill of prompt positions {start}..{len(context_ids) - 1}",
                                lambda: fused.inputs_embeds[:, start:])
        outcome.prefill_s = time.perf_counter() - t0
        capacity = getattr(getattr(cache, "shape", None), "max_len", None)
        t1 = time.perf_counter()
        while True:
            token = sampler(logits, seen)
            outcome.tokens.append(token)
            seen.append(token)
            if on_token is not None:
                on_token(token)
            if token in stops:
                outcome.stop_reason = "eos"
                break
            if len(outcome.tokens) >= max_new_tokens:
                outcome.stop_reason = "max_new_tokens"
                break
            if capacity is not None and cache.length >= capacity:
                outcome.stop_reason = "context_full"
                break
            ids = torch.tensor([[token]], device=self.model.device)
            logits = self._retrying(
                cache, lambda ids=ids: self.model.decode_step(ids, cache, fused.rope_delta)[0, -1], outcome,
                f"decode step {len(outcome.tokens)} (after token {token})", lambda ids=ids: self.model.embed(ids))
        outcome.decode_s = time.perf_counter() - t1
        return outcome
