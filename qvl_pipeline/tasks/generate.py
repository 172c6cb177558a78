"""task=generate: answer one prompt (+ images), streaming text, or printing one JSON object (output=json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qvl_pipeline.config.schema import RootConfig
from qvl_pipeline.container import RootContainer
from qvl_pipeline.errors import InputError
from qvl_pipeline.plan import render_plan
from qvl_pipeline.runtime.pipeline import Pipeline
from qvl_pipeline.tasks.results import request_record, save_results

MAX_PROMPT_FILE_BYTES = 16 * 1024**2     # far more text than any context holds (~4 bytes per token)


def request_images(config: RootConfig) -> list[str]:
    """`image=P` and `images=[P1,P2]` together, in that order."""
    return ([config.image] if config.image else []) + list(config.images)


def read_prompt_file(name: str) -> str:
    """The text of a prompt file (`-`: standard input), read as UTF-8; an InputError names the file when it is
    missing, unreadable, a folder, larger than MAX_PROMPT_FILE_BYTES or not UTF-8."""
    label = "standard input (prompt_file=-)" if name == "-" else f"prompt_file={name}"
    fix = "pass a UTF-8 text file: prompt_file=PATH (or prompt_file=- to read standard input)"
    try:
        if name == "-":
            if sys.stdin is None:
                raise InputError(f"{label}: there is no standard input", fix)
            data = sys.stdin.buffer.read(MAX_PROMPT_FILE_BYTES + 1)
        else:
            path = Path(name).expanduser()
            if path.is_dir():
                raise InputError(f"{label} is a folder, not a file", fix)
            with open(path, "rb") as fh:
                data = fh.read(MAX_PROMPT_FILE_BYTES + 1)
    except OSError as exc:
        raise InputError(f"cannot read {label}: {exc.strerror or exc}", fix) from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise InputError(f"{label} is larger than {MAX_PROMPT_FILE_BYTES // 1024**2} MiB, far more than a context "
                         "holds", "shorten the prompt")
    return decode_utf8(data, label, "save the file as UTF-8 (e.g. iconv -t UTF-8)")


def decode_utf8(data: bytes, what: str, fix: str) -> str:
    """`data` as UTF-8 text, or an InputError naming `what` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} is not valid UTF-8 (byte {exc.start}: {data[exc.start:exc.start + 1]!r})",
                         fix) from None


def request_prompt(config: RootConfig) -> str:
    """The prompt: the text of `prompt_file` when given (it wins over `prompt`), else `prompt` as typed."""
    return read_prompt_file(config.prompt_file) if config.prompt_file else config.prompt


def check_images(config: RootConfig, container: RootContainer) -> None:
    """Decode and size the request's images with the run's image processor before any weights load, so a missing
    or broken image fails in a second (InputError naming it), not after loading the model."""
    images = request_images(config)
    if images:
        container.vision.image_processor()(images)


def run(config: RootConfig, container: RootContainer, results_dir: Path | None = None) -> int:
    as_json = config.output == "json"
    prompt = request_prompt(config)              # a bad prompt file or image fails before the model loads
    check_images(config, container)
    pipe = Pipeline.from_container(container)
    print(render_plan(pipe.plan), file=sys.stderr)
    if pipe.is_demo:
        print("qvl-pipeline: model=tiny runs DEMO weights (deterministic random): the pipeline is real, the words "
              "are not. Pass model.path=/path/to/Qwen3-VL-... for a real answer.", file=sys.stderr)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    images = request_images(config) or ([] if config.video else pipe.demo_images())
    result = pipe.generate(prompt, images, video=config.video,
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
        save_results(results_dir, result, request=request_record(config, prompt, images, config.video))
    return 0
