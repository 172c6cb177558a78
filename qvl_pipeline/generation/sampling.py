"""Next-token choice from logits: greedy, or temperature / top-k / top-p / min-p sampling with a seed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from qvl_pipeline.errors import ConfigError

SEED_LIMIT = 2**63          # torch generators take seeds below 2**63 (as signed 64-bit integers)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0     # 0 = greedy
    top_k: int = 0               # 0 = off
    top_p: float = 1.0           # 1 = off
    min_p: float = 0.0           # 0 = off
    repetition_penalty: float = 1.0
    seed: int = 0

    def check(self) -> SamplingParams:
        """Raise ConfigError naming the first out-of-range value (the one place these ranges live: the CLI's
        config validation and per-request overrides both come here)."""
        finite = all(math.isfinite(v) for v in (self.temperature, self.top_p, self.min_p, self.repetition_penalty))
        rules = ((finite, "generate.temperature, top_p, min_p and repetition_penalty must be finite numbers",
                  (self.temperature, self.top_p, self.min_p, self.repetition_penalty)),
                 (self.temperature >= 0, "generate.temperature must be ≥ 0 (0 = greedy)", self.temperature),
                 (self.top_k >= 0, "generate.top_k must be ≥ 0 (0 = off)", self.top_k),
                 (0 < self.top_p <= 1, "generate.top_p must be in (0, 1] (1 = off)", self.top_p),
                 (0 <= self.min_p < 1, "generate.min_p must be in [0, 1) (0 = off)", self.min_p),
                 (self.repetition_penalty > 0, "generate.repetition_penalty must be > 0 (1 = off)",
                  self.repetition_penalty),
                 (0 <= self.seed < SEED_LIMIT, f"generate.seed must be in [0, 2**63 - 1 = {SEED_LIMIT - 1}]",
                  self.seed))
        for ok, message, value in rules:
            if not ok:
                raise ConfigError(f"{message}, got {value}", "fix the value on the command line")
        return self


def apply_repetition_penalty(logits: torch.Tensor, seen: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already in the context: divide positive logits, multiply negative ones.

    logits: [vocab] fp32.
    """
    if penalty == 1.0 or not seen:
        return logits
    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    picked = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Set to -inf every token outside the top-k / nucleus (top-p) / min-p set. logits: [vocab] fp32."""
    out = logits.clone()
    if top_k > 0 and top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if min_p > 0:
        probs = torch.softmax(out, dim=-1)
        out[probs < min_p * probs.max()] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first token always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        out[order[drop_sorted]] = float("-inf")
    return out


class Sampler:
    """Chooses tokens for one request; its generator makes sampling reproducible for a seed."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params.check()
        self.generator = torch.Generator().manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor, seen: Sequence[int]) -> int:
        """logits: [vocab] (any dtype) for the next position; seen: ids in the context so far."""
        p = self.params
        scores = apply_repetition_penalty(logits.float().cpu(), seen, p.repetition_penalty)
        if p.temperature == 0:
            return int(torch.argmax(scores))
        # Shifted so the best score is 0 before dividing: a tiny temperature then gives 0 and -inf (greedy in the
        # limit) instead of inf - inf = NaN; the softmax is unchanged by the shift.
        scores = filter_logits((scores - scores.max()) / p.temperature, p.top_k, p.top_p, p.min_p)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
