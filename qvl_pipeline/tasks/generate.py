"""task=generate: answer one prompt (+ images), streaming text, or printing one JSON object (output=json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.plan import render_plan
from qvl_pipeline.runtime.pipeline import Pipeline
from qvl_pipeline.tasks.results import save_results


def request_images(config: RootConfig) -> list[str]:
    """`image=P` and `images=[P1,P2]` together, in that order."""
    return ([config.image] if config.image else []) + list(config.images)


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    as_json = config.output == "json"
    pipe = Pipeline.from_container(container)
    print(render_plan(pipe.plan), file=sys.stderr)
    if pipe.is_demo:
        print("qvl-pipeline: model=tiny runs DEMO weights (deterministic random): the pipeline is real, the words "
              "are not. Pass model.path=/path/to/Qwen3-VL-... for a real answer.", file=sys.stderr)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    images = request_images(config) or ([] if config.video else pipe.demo_images())
    result = pipe.generate(config.prompt, images, video=config.video,
                           on_text=None if as_json else stream)
    if as_json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        t = result["timings"]
        print("", flush=True)
        print(f"qvl-pipeline: {len(result['token_ids'])} tokens ({result['stop_reason']}); prompt "
              f"{result['prompt_tokens']} tokens; load {t['load_s']:.2f} s, vision {t['vision_s']:.3f} s, prefill "
              f"{t['prefill_s']:.3f} s, decode {t['decode_tokens_per_s']:.1f} tok/s", file=sys.stderr)
    if results_dir is not None:
        save_results(results_dir, result)
    return 0
