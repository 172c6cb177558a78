"""One system measured in a fresh process, so that its peak RSS is its own:

  python -m qvl_pipeline.bench.worker ours|reference SPEC.json RESULT.json

SPEC holds the run's typed config (as plain data), the checkpoint folder, the picture, the prompt, the tokens and
rounds. Each system loads, runs one short warm-up generate of the same request, then `rounds` measured greedy
generates; RESULT gets load time, per-round timings, peak RSS and the weight bytes a decode step reads, taken from
the loaded model's real tensors (whatever format the kernels plugin left them in). Progress lines go to stderr,
prefixed `bench:`; a failure is written to RESULT as {"error": {type, message, hint}} and the exit status is non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qvl_pipeline.config.schema import RootConfig

WARMUP_TOKENS = 2
PROGRESS_PREFIX = "bench: "


def progress(text: str) -> None:
    print(f"{PROGRESS_PREFIX}{text}", file=sys.stderr, flush=True)


def peak_rss_gib() -> float:
    """This process's peak resident memory so far (GiB; Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def rss_gib() -> float:
    """This process's resident memory now (GiB)."""
    import psutil

    return round(psutil.Process().memory_info().rss / 1024**3, 3)


def config_to_dict(config: RootConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> RootConfig:
    """The RootConfig `config_to_dict` made (no interpolation: user text stays as it was), range-checked again."""
    from qvl_pipeline.config.load import validate_config

    hints = typing.get_type_hints(RootConfig)
    kwargs = {name: hints[name](**value) if dataclasses.is_dataclass(hints[name]) else value
              for name, value in data.items()}
    config = RootConfig(**kwargs)
    validate_config(config)
    return config


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    """Bytes per dtype of `tensors`, each storage counted once (a tied or shared tensor is read once)."""
    seen: set[tuple[str, int]] = set()
    by_dtype: dict[str, int] = {}
    for tensor in tensors:
        key = (str(tensor.device), tensor.untyped_storage().data_ptr() + tensor.storage_offset()
               * tensor.element_size())
        if key in seen or tensor.is_meta:
            continue
        seen.add(key)
        name = str(tensor.dtype).removeprefix("torch.")
        by_dtype[name] = by_dtype.get(name, 0) + tensor.numel() * tensor.element_size()
    return by_dtype


def module_tensors(*modules: torch.nn.Module) -> list[torch.Tensor]:
    return [t for m in modules for t in (*m.parameters(), *m.buffers())]


def weights_read_per_token(layers: torch.nn.Module, norm: torch.nn.Module, head: list[torch.Tensor]) -> dict:
    """What one decode step reads of the weights: every decoder layer, the final norm and the output head (the
    embedding matrix when the head is tied and not replaced); one embedding row is negligible. Bytes per dtype and
    in total, from the tensors as loaded (quantised codes with their scales, or the float weights)."""
    by_dtype = tensor_bytes([*module_tensors(layers, norm), *head])
    return {"bytes": sum(by_dtype.values()), "by_dtype": by_dtype}


def _median(values: list[float]) -> float:
    import statistics

    return round(statistics.median(values), 4) if values else float("nan")


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the measured rounds (TTFT = vision + prefill, the first token's wait after the request's
    inputs are prepared)."""
    keys = ("vision_s", "prefill_s", "ttft_s", "decode_tokens_per_s")
    return {key: _median([r[key] for r in rounds]) for key in keys}


# ---- this project --------------------------------------------------------------------------------------------

def ours(spec: dict[str, Any]) -> dict[str, Any]:
    from qvl_pipeline.bench.accuracy import against_exact, answer, uses_references
    from qvl_pipeline.container import make_container
    from qvl_pipeline.hardware.effective import apply_threads
    from qvl_pipeline.runtime.pipeline import Pipeline

    config = config_from_dict(spec["config"])
    container = make_container(config)
    report = container.core.hardware_report()
    if report.threads is not None:
        apply_threads(report.threads)          # the ISA caps and OpenMP binding came with the parent's environment
    progress("qvl-pipeline: loading")
    pipe = Pipeline.from_container(container)
    plan = pipe.plan
    loaded_rss = rss_gib()
    prompt, images, tokens = spec["prompt"], [spec["image"]], spec["tokens"]
    progress(f"qvl-pipeline: loaded in {pipe.load_s:.2f} s; warm-up ({WARMUP_TOKENS} tokens)")
    feature_cache = pipe.model.feature_cache

    def once(new_tokens: int) -> dict[str, Any]:
        if feature_cache is not None:
            feature_cache.clear()            # every round pays the vision tower, as a new image would
        return pipe.generate(prompt, images, max_new_tokens=new_tokens, temperature=0.0)

    once(WARMUP_TOKENS)
    rounds, first_ids = [], None
    for i in range(spec["rounds"]):
        result = once(tokens)
        t = result["timings"]
        rounds.append({"vision_s": t["vision_s"], "prefill_s": t["prefill_s"],
                       "ttft_s": round(t["vision_s"] + t["prefill_s"], 4),
                       "decode_tokens_per_s": t["decode_tokens_per_s"], "new_tokens": len(result["token_ids"]),
                       "stop_reason": result["stop_reason"]})
        first_ids = first_ids or result["token_ids"]
        progress(f"qvl-pipeline: round {i + 1}/{spec['rounds']}: TTFT {rounds[-1]['ttft_s']:.2f} s, decode "
                 f"{t['decode_tokens_per_s']:.2f} tok/s")
    lm = pipe.model.model.language_model
    head = list(pipe.model.lm_head.parameters()) + list(pipe.model.lm_head.buffers()) \
        if pipe.model.lm_head is not None else [lm.embed_tokens.weight]
    out: dict[str, Any] = {
        "system": f"qvl-pipeline opt={config.opt.level}", "load_s": round(pipe.load_s, 4),
        "rss_after_load_gib": loaded_rss, "peak_rss_gib": peak_rss_gib(), "prompt_tokens": result["prompt_tokens"],
        "rounds": rounds,
        **summarise(rounds), "weights_read_per_token": weights_read_per_token(lm.layers, lm.norm, head),
        "kernels": plan["slots"]["kernels"]["chosen"],
        "pixels": {"min_pixels": pipe.images.config.min_pixels, "max_pixels": pipe.images.config.max_pixels},
        "plugins": {slot: decision["chosen"] for slot, decision in plan["slots"].items()}, "plan": plan,
    }
    if spec["accuracy"]:
        reuse = first_ids if tokens >= spec["accuracy_tokens"] else None
        progress("qvl-pipeline: accuracy: the level's greedy answer and first-token logits")
        mine = answer(pipe, prompt, images, reuse)
        if uses_references(plan["slots"]):
            out["accuracy"] = {"same_as_exact": True,
                               "note": "this run chose every slot's reference plugin: it is the exact path"}
        else:
            del pipe, container, feature_cache, lm, head
            out["accuracy"] = against_exact(mine, config, prompt, images, progress).to_dict()
    return out


# ---- the transformers reference ------------------------------------------------------------------------------

def reference(spec: dict[str, Any]) -> dict[str, Any]:
    """Qwen3VLForConditionalGeneration in bf16 with sdpa attention, fed the same ids and pixels as this project
    (its own processors are not used: the prompt is identical by construction; spec["pixels"] is the pixel budget
    this project's run used). Times are stamped by a logits
    processor (the first call ends the prefill) and by hooks around the vision tower."""
    from transformers import LogitsProcessor, LogitsProcessorList, Qwen3VLForConditionalGeneration

    from qvl_pipeline.processing.chat_template import ChatTemplate
    from qvl_pipeline.processing.image import ImageProcessor
    from qvl_pipeline.processing.prompt import build_prompt
    from qvl_pipeline.processing.tokenizer import Tokenizer

    folder = spec["folder"]
    progress("transformers: loading (bf16, sdpa)")
    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16,
                                                            attn_implementation="sdpa").eval()
    load_s = time.perf_counter() - start
    loaded_rss = rss_gib()
    vision = ImageProcessor.from_folder(folder, **spec["pixels"])([spec["image"]])    # ours' pixel budget
    ids = torch.tensor([build_prompt(Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder), spec["prompt"],
                                     image_tokens=vision.token_counts()).input_ids])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": vision.pixel_values.to(torch.bfloat16), "image_grid_thw": vision.grid_thw,
              "mm_token_type_ids": (ids == model.config.image_token_id).long()}

    class Stamps(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    vision_times: list[float] = []
    tower = model.model.visual
    tower.register_forward_pre_hook(lambda *_: vision_times.append(time.perf_counter()))
    tower.register_forward_hook(lambda *_: vision_times.append(time.perf_counter()))

    def once(new_tokens: int) -> dict[str, Any]:
        stamps = Stamps()
        vision_times.clear()
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([stamps]), pad_token_id=0)
        ttft = stamps.times[0] - t0
        vision_s = vision_times[1] - vision_times[0] if len(vision_times) >= 2 else 0.0
        steps = len(stamps.times) - 1
        tps = steps / (stamps.times[-1] - stamps.times[0]) if steps else 0.0
        return {"vision_s": round(vision_s, 4), "prefill_s": round(ttft - vision_s, 4), "ttft_s": round(ttft, 4),
                "decode_tokens_per_s": round(tps, 3), "new_tokens": len(stamps.times),
                "stop_reason": "max_new_tokens"}

    progress(f"transformers: loaded in {load_s:.2f} s; warm-up ({WARMUP_TOKENS} tokens)")
    once(WARMUP_TOKENS)
    rounds = []
    for i in range(spec["rounds"]):
        rounds.append(once(spec["tokens"]))
        progress(f"transformers: round {i + 1}/{spec['rounds']}: TTFT {rounds[-1]['ttft_s']:.2f} s, decode "
                 f"{rounds[-1]['decode_tokens_per_s']:.2f} tok/s")
    lm = model.model.language_model
    return {"system": "transformers bf16 sdpa", "load_s": round(load_s, 4), "rss_after_load_gib": loaded_rss,
            "peak_rss_gib": peak_rss_gib(),
            "prompt_tokens": int(ids.shape[1]), "rounds": rounds, **summarise(rounds),
            "weights_read_per_token": weights_read_per_token(lm.layers, lm.norm, list(model.lm_head.parameters())),
            "kernels": "transformers bf16"}


def main(argv: list[str]) -> int:
    from qvl_pipeline.errors import QvlError

    kind, spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    torch.set_num_threads(spec["threads"])
    try:
        result = ours(spec) if kind == "ours" else reference(spec)
        code = 0
    except QvlError as exc:
        result, code = {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}, \
            exc.exit_code
    except Exception as exc:
        text = " ".join(str(exc).split())[:300] or "(no message)"
        result, code = {"error": {"type": type(exc).__name__, "message": f"{type(exc).__name__}: {text}",
                                  "hint": ""}}, 1
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
