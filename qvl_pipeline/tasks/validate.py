"""task=validate: proof that this machine's choices are right — every plugin the plan picked runs its self-test
against its slot's reference, and the whole pipeline with those choices is compared end to end with opt=minimal
on the tiny demo model. Prints a pass/fail table; exits non-zero when anything fails."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.config.schema import ModelConfig, RootConfig
from qvl_pipeline.container import RootContainer, make_container
from qvl_pipeline.errors import QvlError
from qvl_pipeline.slots import SLOTS
from qvl_pipeline.slots.selftest import END_TO_END_TOLERANCE, TOLERANCE
from qvl_pipeline.tasks.results import write_unit

PROMPTS = ("Describe this picture.", "Write one sentence about the sea.")
TOKENS = 16
END_TO_END = "end to end vs reference plugins (tiny demo)"


@dataclasses.dataclass
class Check:
    name: str
    passed: bool
    detail: str
    seconds: float = 0.0


def self_tests(container: RootContainer) -> list[Check]:
    """Each plugin the run uses (as the container provides it) against its slot's reference plugin."""
    resolver = container.core.resolver()
    checks = []
    for slot in SLOTS:
        plugin = getattr(container.core, slot)()
        reference = resolver.reference(slot)
        start = time.perf_counter()
        try:
            plugin.self_test(reference)
            checks.append(Check(f"{slot}={plugin.name} self-test vs {reference.name}", True,
                                f"{plugin.fidelity.name.lower()}: within {TOLERANCE[plugin.fidelity]:g} relative",
                                time.perf_counter() - start))
        except Exception as exc:
            checks.append(Check(f"{slot}={plugin.name} self-test vs {reference.name}", False,
                                f"{type(exc).__name__}: {exc}", time.perf_counter() - start))
    return checks


def demo_config(config: RootConfig, **changes: Any) -> RootConfig:
    """The same run on the tiny demo model (no checkpoint needed), with `changes` to the opt level or slots."""
    tiny = ModelConfig(name="tiny", demo=True, dtype="auto", hf_config=_tiny_hf())
    return dataclasses.replace(config, model=tiny, progress=False, **changes)


def _tiny_hf() -> dict[str, Any]:
    from qvl_pipeline.config.load import load_config

    return dict(load_config(["model=tiny"]).model.hf_config)


def end_to_end(config: RootConfig) -> Check:
    """Greedy tokens and first-token logits of this configuration vs opt=minimal, on the tiny demo model."""
    from qvl_pipeline.runtime.pipeline import Pipeline

    start = time.perf_counter()
    mine = Pipeline.from_container(make_container(demo_config(config)))
    # The same run with every slot on its reference plugin (what opt=minimal picks), budgets unchanged, so the
    # comparison isolates what the chosen plugins change.
    resolver = mine.run_plan.resolver
    references = {slot: dataclasses.replace(getattr(config, slot), choice=SLOTS[slot].reference) for slot in SLOTS}
    opt = dataclasses.replace(config.opt, level="minimal", max_fidelity="reference")
    reference = Pipeline.from_container(make_container(demo_config(config, opt=opt, **references)))
    agree = total = 0
    worst = 0.0
    for prompt in PROMPTS:
        images = mine.demo_images()
        a = mine.generate(prompt, images, max_new_tokens=TOKENS, temperature=0.0)["token_ids"]
        b = reference.generate(prompt, images, max_new_tokens=TOKENS, temperature=0.0)["token_ids"]
        same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        agree, total = agree + same, total + max(len(a), len(b))
        got, want = mine.first_logits(prompt, images), reference.first_logits(prompt, images)
        if not torch.isfinite(got).all():
            return Check(END_TO_END, False, "non-finite logits",
                         time.perf_counter() - start)
        worst = max(worst, ((got - want).norm() / want.norm()).item())
    allowed = max(END_TO_END_TOLERANCE[resolver.resolve(slot).fidelity] for slot in SLOTS)
    return Check(END_TO_END, worst <= allowed,
                 f"{agree}/{total} greedy tokens agree before the first difference; first-token logits "
                 f"relative error {worst:.2e} (allowed {allowed:g})", time.perf_counter() - start)


def render(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'check':<{width}}  result  seconds  detail"]
    lines += [f"{c.name:<{width}}  {'pass' if c.passed else 'FAIL':<6}  {c.seconds:7.2f}  {c.detail}" for c in checks]
    failed = sum(not c.passed for c in checks)
    lines.append(f"{len(checks) - failed} passed, {failed} failed")
    return "\n".join(lines)


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    checks = self_tests(container)
    try:
        checks.append(end_to_end(config))
    except QvlError as exc:
        checks.append(Check(END_TO_END, False, exc.message))
    text = render(checks)
    if config.output == "json":
        print(json.dumps([dataclasses.asdict(c) for c in checks], indent=2))
    else:
        print(text)
    if results_dir is not None:
        write_unit(results_dir, {"validate.json": [dataclasses.asdict(c) for c in checks]})
    return 0 if all(c.passed for c in checks) else 6
