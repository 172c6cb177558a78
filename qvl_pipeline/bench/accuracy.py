"""What an optimisation level costs in accuracy: the same request through the level's plugins and through the exact
path (opt=minimal: every slot on its reference plugin), compared by greedy agreement and first-token logits."""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import make_container
from qvl_pipeline.runtime.pipeline import Pipeline
from qvl_pipeline.slots import SLOTS

ACCURACY_TOKENS = 32           # greedy tokens compared


@dataclass(frozen=True)
class Answer:
    """A greedy answer and the logits [vocab] (fp32) that chose its first token."""

    tokens: list[int]
    first_logits: torch.Tensor


@dataclass(frozen=True)
class Agreement:
    """How far the level's answer sits from the exact path's."""

    agree: int                     # greedy tokens equal before the first difference
    compared: int                  # tokens compared: the longer of the two answers
    max_abs_logit_error: float     # max |logit - exact logit| over the vocabulary, first answer token
    rel_logit_error: float         # ‖logits - exact‖ / ‖exact‖
    exact_logit_range: float       # max - min of the exact logits (scale for the absolute error)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def reference_config(config: RootConfig) -> RootConfig:
    """The same run on the exact path: every slot on its reference plugin, opt=minimal, budgets unchanged."""
    references = {slot: dataclasses.replace(getattr(config, slot), choice=SLOTS[slot].reference) for slot in SLOTS}
    opt = dataclasses.replace(config.opt, level="minimal", max_fidelity="reference")
    return dataclasses.replace(config, opt=opt, **references)


def uses_references(slots: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether a plan's slots (plan["slots"]) chose every slot's reference plugin: the exact path itself."""
    return all(slots[slot]["chosen"] == SLOTS[slot].reference for slot in SLOTS)


def answer(pipe: Pipeline, prompt: str, images: Sequence[str], tokens: list[int] | None = None) -> Answer:
    """The pipeline's greedy answer (ACCURACY_TOKENS tokens; `tokens` when already generated) and first logits."""
    if tokens is None:
        tokens = pipe.generate(prompt, images, max_new_tokens=ACCURACY_TOKENS, temperature=0.0)["token_ids"]
    return Answer(list(tokens[:ACCURACY_TOKENS]), pipe.first_logits(prompt, images))


def agreement(mine: Answer, exact: Answer) -> Agreement:
    """Compare an answer with the exact path's (pure)."""
    same = next((i for i, (a, b) in enumerate(zip(mine.tokens, exact.tokens, strict=False)) if a != b),
                min(len(mine.tokens), len(exact.tokens)))
    diff = (mine.first_logits - exact.first_logits).abs()
    rel = (diff.norm() / exact.first_logits.norm().clamp_min(1e-30)).item()
    return Agreement(agree=same, compared=max(len(mine.tokens), len(exact.tokens)),
                     max_abs_logit_error=float(diff.max()), rel_logit_error=rel,
                     exact_logit_range=float(exact.first_logits.max() - exact.first_logits.min()))


def against_exact(mine: Answer, config: RootConfig, prompt: str, images: Sequence[str],
                  progress: Callable[[str], None] = lambda _: None) -> Agreement:
    """`mine` (the level's answer under `config`) against the exact path's answer on the same model, loaded now."""
    progress("loading the exact path (opt=minimal) on the same checkpoint")
    exact_pipe = Pipeline.from_container(make_container(reference_config(config)))
    progress(f"exact path: {ACCURACY_TOKENS} greedy tokens and first-token logits")
    exact = answer(exact_pipe, prompt, images)
    del exact_pipe
    gc.collect()
    return agreement(mine, exact)


def tiny_accuracy(config: RootConfig, prompt: str) -> dict[str, Any]:
    """The level's plugins vs the exact path on the tiny demo model (task=validate's parity configuration)."""
    from qvl_pipeline.tasks.validate import demo_config

    mine_pipe = Pipeline.from_container(make_container(demo_config(config)))
    images = mine_pipe.demo_images()
    mine = answer(mine_pipe, prompt, images)
    chosen = {slot: decision["chosen"] for slot, decision in mine_pipe.plan["slots"].items()}
    exact_pipe = Pipeline.from_container(make_container(demo_config(reference_config(config))))
    result = agreement(mine, answer(exact_pipe, prompt, images))
    return {"model": "tiny demo (task=validate's parity config)", "plugins": chosen, **result.to_dict()}
