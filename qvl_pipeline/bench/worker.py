"""One measurement in a fresh process (so peak RSS is its own): load, or load + generate, ours or reference."""

from __future__ import annotations

import json
import resource
import sys
import time

import torch


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3)


def ours(folder: str, tokens: int, overrides: list[str]) -> dict:
    from qvl_pipeline import Pipeline

    start = time.perf_counter()
    pipe = Pipeline.from_overrides([f"model.path={folder}", "progress=false", "model.name=bench", *overrides]).load()
    load_s = time.perf_counter() - start
    out = {"load_s": round(load_s, 3), "rss_after_load_gib": peak_rss_gib(),
           "plan": {s: d["chosen"] for s, d in pipe.plan["slots"].items()}}
    if tokens:
        result = pipe.generate("Write a long story about a lighthouse.", max_new_tokens=tokens)
        out.update(prefill_s=result["timings"]["prefill_s"], decode_tokens_per_s=result["timings"][
            "decode_tokens_per_s"], generated=len(result["token_ids"]), prompt_tokens=result["prompt_tokens"])
    return out


def reference(folder: str, tokens: int) -> dict:
    from transformers import Qwen3VLForConditionalGeneration

    from qvl_pipeline.processing.chat_template import ChatTemplate
    from qvl_pipeline.processing.prompt import build_prompt
    from qvl_pipeline.processing.tokenizer import Tokenizer

    start = time.perf_counter()
    model = Qwen3VLForConditionalGeneration.from_pretrained(folder, dtype="auto").eval()
    out = {"load_s": round(time.perf_counter() - start, 3), "rss_after_load_gib": peak_rss_gib()}
    if tokens:
        prompt = build_prompt(Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder),
                              "Write a long story about a lighthouse.")
        ids = torch.tensor([prompt.input_ids])
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            prefill = time.perf_counter() - t0
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            total = time.perf_counter() - t1
        out.update(prefill_s=round(prefill, 3),
                   decode_tokens_per_s=round((tokens - 1) / max(total - prefill, 1e-9), 3),
                   generated=tokens, prompt_tokens=len(prompt.input_ids))
    return out


if __name__ == "__main__":
    impl, folder, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = ours(folder, tokens, sys.argv[4:]) if impl == "ours" else reference(folder, tokens)
    result["peak_rss_gib"] = peak_rss_gib()
    print(json.dumps(result))
